"""Webhooks (Standard Webhooks): the delivery body, the retry schedule and the URL policy.

Shared by the API (which refuses unsafe URLs at submit) and the control worker's courier
(:mod:`worker.courier`, which checks them again before every attempt and sends the body). Torch-
and HTTP-free: signing happens in the courier with the ``standardwebhooks`` package.

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
from typing import Any
from urllib.parse import urlsplit

# The notify event a job asks for -> the webhook's ``type``.
EVENT_TYPES: dict[str, str] = {"started": "job.started", "megabatch": "job.megabatch", "completed": "job.completed"}
SECRET_PREFIX = "whsec_"

# Name lookups run here, so a resolver that hangs costs the caller only its timeout.
_RESOLVER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook-resolve")


class UnsafeUrl(ValueError):
    """A webhook URL this server will not call; the message says why."""


def new_secret() -> str:
    """A signing secret in the Standard Webhooks form: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def new_message_id() -> str:
    """A delivery's ``webhook-id``: fixed when the delivery is queued, the same on every retry."""
    return f"msg_{uuid.uuid4().hex}"


def retry_delay_s(attempt: int, *, base_s: float, max_s: float) -> float:
    """The wait after failed attempt number ``attempt`` (1-based): base, 2 base, 4 base, ... capped."""
    return float(min(max_s, base_s * 2 ** min(max(attempt - 1, 0), 30)))


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
    future = _RESOLVER.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=timeout_s)
    except FutureTimeout:
        raise UnsafeUrl(f"the name {host} did not resolve within {timeout_s:g} s") from None
    except (OSError, UnicodeError) as exc:
        raise UnsafeUrl(f"the name {host} does not resolve ({exc})") from None
    found = sorted({str(info[4][0]) for info in infos})
    if not found:
        raise UnsafeUrl(f"the name {host} has no address")
    return found


def check_url(url: str, *, allow_private: bool, timeout_s: float) -> None:
    """Raise :class:`UnsafeUrl` unless every address the URL's host resolves to is public.

    With ``allow_private`` nothing is looked up. The name may resolve differently later, so the
    courier calls this again before every attempt.
    """
    if allow_private:
        return
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host:
        raise UnsafeUrl("the URL has no host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for address in _addresses(host, port, timeout_s):
        reason = forbidden_reason(address)
        if reason is not None:
            where = "" if host == address else f"{host} resolves to {address}: "
            raise UnsafeUrl(f"{where}{reason}; webhooks go to public addresses only on this server")
