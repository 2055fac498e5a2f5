"""Webhooks (Standard Webhooks): the delivery body, the retry schedule and the URL policy.

Shared by the API (which refuses unsafe URLs at submit) and the control worker's courier
(:mod:`worker.courier`, which resolves and checks them again before every attempt, then connects
to exactly the addresses it checked, never resolving the name a second time). Torch- and
HTTP-free: signing happens in the courier with the ``standardwebhooks`` package.

Every delivery has a deadline, :func:`delivery_window_s` after it was queued: the whole retry
schedule and the longest time each attempt may take. Past it the delivery is given up, whether a
courier ever tried it or not (the store's :meth:`~app_common.store.webhooks.WebhookOps.expire_deliveries`,
called by every worker's reaper and by the courier).

Body of every delivery (one JSON object, the same bytes on every retry)::

    {"type": "job.started" | "job.megabatch" | "job.completed",
     "timestamp": "<ISO time of the event>",
     "data": <the job as GET /api/v1/jobs/{id} returned it right after the event>,
     "megabatch": {"index": n, "metrics": {...}}}        # job.megabatch only
"""

from __future__ import annotations

import base64
import ipaddress
import json
import secrets
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from app_common.settings import Settings

# The notify event a job asks for -> the webhook's ``type``.
EVENT_TYPES: dict[str, str] = {"started": "job.started", "megabatch": "job.megabatch", "completed": "job.completed"}
SECRET_PREFIX = "whsec_"

# Name lookups run here, so a resolver that hangs costs the caller only its timeout.
_RESOLVER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook-resolve")


class UnsafeUrl(ValueError):
    """A webhook URL this server will not call; the message says why."""


class Unresolvable(UnsafeUrl):
    """The URL's host has no address (the name does not resolve, or not in time)."""


def new_secret() -> str:
    """A signing secret in the Standard Webhooks form: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def new_message_id() -> str:
    """A delivery's ``webhook-id``: fixed when the delivery is queued, the same on every retry."""
    return f"msg_{uuid.uuid4().hex}"


def retry_delay_s(attempt: int, *, base_s: float, max_s: float) -> float:
    """The wait after failed attempt number ``attempt`` (1-based): base, 2 base, 4 base, ... capped."""
    return float(min(max_s, base_s * 2 ** min(max(attempt - 1, 0), 30)))


def delivery_window_s(settings: Settings) -> float:
    """How long after it was queued a delivery may still be attempted: every wait of the retry
    schedule plus, for each attempt, the name lookup and the request's timeout (defaults:
    3,635 + 13 x 12 s, about 63 min). Past it the delivery is given up."""
    waits = sum(
        retry_delay_s(n, base_s=settings.webhook_retry_base_s, max_s=settings.webhook_retry_max_s)
        for n in range(1, settings.webhook_max_attempts)
    )
    return waits + settings.webhook_max_attempts * (settings.webhook_resolve_timeout_s + settings.webhook_timeout_s)


def delivery_body(event: str, timestamp: str, data: dict[str, Any], megabatch: dict[str, Any] | None) -> str:
    """The JSON body of a delivery of ``event`` (a notify event name)."""
    body: dict[str, Any] = {"type": EVENT_TYPES[event], "timestamp": timestamp, "data": data}
    if megabatch is not None:
        body["megabatch"] = megabatch
    return json.dumps(body, separators=(",", ":"), allow_nan=False)


def forbidden_reason(address: str) -> str | None:
    """Why the courier may not call ``address`` (an IP address as text); None when it may."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "private", "link_local", "unspecified", "multicast", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return f"{ip} is a {kind.replace('_', '-')} address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    return None


def _addresses(host: str, port: int, timeout_s: float) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]  # an IP literal: nothing to look up
    except ValueError:
        pass
    # socket.getaddrinfo is looked up at each call: the one lookup of an attempt goes through
    # whatever resolver the process has (tests put one in front of the system's).
    future = _RESOLVER.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=timeout_s)
    except FutureTimeout:
        raise Unresolvable(f"the name {host} did not resolve within {timeout_s:g} s") from None
    except (OSError, UnicodeError) as exc:
        raise Unresolvable(f"the name {host} does not resolve ({exc})") from None
    # The resolver's order (its preference), each address once.
    found = list(dict.fromkeys(str(info[4][0]) for info in infos if info[4]))
    if not found:
        raise Unresolvable(f"the name {host} has no address")
    return found


def vetted_addresses(url: str, *, allow_private: bool, timeout_s: float) -> list[str]:
    """The addresses of the URL's host, in the resolver's order, once each, all of them public
    (any address with a :func:`forbidden_reason` refuses the whole URL, unless ``allow_private``).

    The courier connects to one of these and to nothing else: a name that would answer a private
    address to a second lookup (DNS rebinding) is never looked up a second time. Raises
    :class:`UnsafeUrl` (:class:`Unresolvable` when the name has no address within ``timeout_s``).
    """
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError as exc:  # a port out of range, a bad IPv6 literal
        raise UnsafeUrl(f"the URL cannot be read ({exc})") from None
    if not host:
        raise UnsafeUrl("the URL has no host")
    addresses = _addresses(host, port or (443 if parts.scheme == "https" else 80), timeout_s)
    if not allow_private:
        for address in addresses:
            reason = forbidden_reason(address)
            if reason is not None:
                where = "" if host == address else f"{host} resolves to {address}: "
                raise UnsafeUrl(f"{where}{reason}; webhooks go to public addresses only on this server")
    return addresses


def check_url(url: str, *, allow_private: bool, timeout_s: float) -> None:
    """Raise :class:`UnsafeUrl` unless every address the URL's host resolves to is public (the
    API's check at submit). With ``allow_private`` nothing is looked up. The name may resolve
    differently later: the courier resolves and checks it again before every attempt
    (:func:`vetted_addresses`)."""
    if allow_private:
        return
    vetted_addresses(url, allow_private=False, timeout_s=timeout_s)
