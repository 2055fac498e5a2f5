"""The webhook courier: delivers the jobs' webhooks from the control worker, off the training path.

The store queues a delivery in the same script that writes the change it reports
(:mod:`app_common.store.webhooks`); this thread, in the main process of every ``control`` worker,
claims due deliveries and sends each on a small thread pool, so a slow receiver holds one thread
and never a job (training processes never send anything). Each attempt:

- resolves the URL's host once and checks every address (its name may resolve to a private
  address by now; such an attempt is recorded as an error, unless ``APP_WEBHOOK_ALLOW_PRIVATE``),
  then connects to one of exactly those addresses: the name is never resolved a second time, so
  a name that answers a public address to the check and a private one to the connection (DNS
  rebinding) reaches nothing private. The request keeps the URL's name in its ``Host`` header and,
  for https, in the TLS SNI and the certificate check (httpcore's ``sni_hostname`` extension);
- signs the body with the owner's current secret (``standardwebhooks``: headers ``webhook-id``,
  the delivery's id on every retry, ``webhook-timestamp`` and ``webhook-signature``);
- POSTs it with httpx: a timeout of ``APP_WEBHOOK_TIMEOUT_S`` (10 s), redirects never followed;
- a 2xx is delivered; anything else is retried after ``base * 2**(n-1)`` seconds, capped at
  ``APP_WEBHOOK_RETRY_MAX_S``, until ``APP_WEBHOOK_MAX_ATTEMPTS`` (about an hour in all by default)
  or until the next attempt would fall past the delivery's deadline (queued time plus
  :func:`~app_common.webhooks.delivery_window_s`; deliveries past it are given up by
  :meth:`~app_common.store.webhooks.WebhookOps.expire_deliveries`, which the courier calls before
  claiming and every worker's reaper calls too).

A claim lasts longer than any attempt can; a courier that dies mid-attempt leaves its claims to
expire and another courier (or the same one restarted) makes the attempt again: at-least-once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
from celery import Celery
from redis.exceptions import RedisError

from app_common.public import public_job
from app_common.settings import Settings
from app_common.store import JobStore, PendingDelivery
from app_common.store._common import format_time
from app_common.store.records import decode_record
from app_common.store.webhooks import now_ms
from app_common.tasks import CONTROL_QUEUE
from app_common.webhooks import (
    EVENT_TYPES,
    Unresolvable,
    UnsafeUrl,
    delivery_body,
    delivery_window_s,
    retry_delay_s,
    vetted_addresses,
)

log = logging.getLogger(__name__)

USER_AGENT = "anytime-prune-webhooks/1"
# An error's text in the delivery history is cut to this length.
_MAX_ERROR = 300
# Seconds between two expiry passes of one courier (every worker's reaper runs them too).
EXPIRE_EVERY_S = 5.0


def claim_lease_s(settings: Settings) -> float:
    """How long a courier holds a claimed delivery: well past the longest attempt (the name
    lookup plus the request's timeout), so a live courier never loses a claim mid-attempt."""
    return 3.0 * (settings.webhook_resolve_timeout_s + settings.webhook_timeout_s) + 30.0


def pinned_request(url: str, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """(URL, headers, request extensions) that send a request for ``url`` to ``address`` (an IP
    the courier vetted) and nowhere else: the URL's host becomes the address, the ``Host`` header
    stays the URL's (name and port), and for https the TLS SNI and the certificate check use the
    URL's name (httpcore's ``sni_hostname`` request extension)."""
    target = httpx.URL(url)
    extensions: dict[str, Any] = {}
    if target.scheme == "https":
        extensions["sni_hostname"] = target.raw_host.decode("ascii")
    return target.copy_with(host=address), {"host": target.netloc.decode("ascii")}, extensions


def build_body(delivery: PendingDelivery) -> str:
    """The delivery's body from the job record the store copied at the event."""
    record = decode_record(delivery.record_fields)
    if record is None:
        raise ValueError(f"delivery {delivery.msg_id}: no job record was kept")
    return delivery_body(delivery.event, delivery.timestamp, public_job(record), delivery.megabatch)


class Courier(threading.Thread):
    """Claims due deliveries every ``poll_s`` and makes their attempts on ``settings.webhook_concurrency``
    threads. Errors are logged, never fatal."""

    def __init__(self, store: JobStore, settings: Settings, *, poll_s: float = 0.5) -> None:
        super().__init__(name="webhook-courier", daemon=True)
        from standardwebhooks import Webhook  # the `webhooks` extra; checked by start_courier

        self._webhook = Webhook
        self.store = store
        self.settings = settings
        self.poll_s = poll_s
        self.lease_s = claim_lease_s(settings)
        self.window_s = delivery_window_s(settings)
        self._expired_at = 0.0  # monotonic time of the last expiry pass
        self._busy = 0  # attempts in progress, at most settings.webhook_concurrency
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="webhook-send")
        # A transport of our own: no proxy from the environment (a proxy would resolve the name
        # itself, and an https tunnel would check the certificate against the address), while
        # SSL_CERT_FILE / SSL_CERT_DIR still apply. No kept-alive connections: each attempt
        # connects to the address it vetted (pooled connections are keyed by address, and one
        # could carry a name's request over a TLS session checked for another name there).
        limits = httpx.Limits(max_connections=settings.webhook_concurrency * 2, max_keepalive_connections=0)
        self._http = httpx.Client(
            timeout=settings.webhook_timeout_s, follow_redirects=False, headers={"user-agent": USER_AGENT},
            transport=httpx.HTTPTransport(limits=limits),
        )
        self._stop_event = threading.Event()
        self._unreachable = False

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        while not self._stop_event.is_set():
            claimed = self.claim_once()
            # Back at once while there is more due work and free threads; else wait a poll.
            if not claimed or self._free() == 0:
                self._stop_event.wait(self.poll_s)

    def _free(self) -> int:
        with self._lock:
            return self.settings.webhook_concurrency - self._busy

    def claim_once(self) -> int:
        """Claim as many due deliveries as there are free threads and start their attempts."""
        free = self._free()
        if free == 0:
            return 0
        try:
            if time.monotonic() - self._expired_at >= EXPIRE_EVERY_S:
                self._expired_at = time.monotonic()
                for msg_id in self.store.expire_deliveries(self.window_s):
                    log.warning("webhook %s: given up, past its deadline (retry window %.0f s)", msg_id, self.window_s)
            token, ids = self.store.claim_deliveries(free, self.lease_s)
            if self._unreachable:
                log.warning("courier: Redis answers again")
                self._unreachable = False
        except (RedisError, OSError) as exc:
            if not self._unreachable:
                log.warning("courier: Redis unreachable (%s); trying again every %.1f s", exc, self.poll_s)
            self._unreachable = True
            return 0
        except Exception:  # a courier that dies silently would deliver nothing ever again
            log.exception("courier: unexpected error")
            return 0
        for msg_id in ids:
            with self._lock:
                self._busy += 1
            self._pool.submit(self._attempt_safely, msg_id, token)
        return len(ids)

    def _attempt_safely(self, msg_id: str, token: str) -> None:
        try:
            self.attempt(msg_id, token)
        except Exception:  # its claim expires and the attempt is made again
            log.exception("courier: delivery %s failed unexpectedly", msg_id)
        finally:
            with self._lock:
                self._busy -= 1

    # --- one attempt ----------------------------------------------------------------------------
    def attempt(self, msg_id: str, token: str) -> dict[str, Any] | None:
        """Make the next attempt of delivery ``msg_id`` (claimed with ``token``); returns its
        history entry (None when the delivery is gone or no longer ours)."""
        delivery = self.store.get_delivery(msg_id)
        if delivery is None or delivery.claim != token:
            return None
        number = delivery.attempts + 1
        started = datetime.now(UTC)
        status_code: int | None = None
        error: str | None = None
        try:
            body = delivery.body or build_body(delivery)
        except (ValueError, TypeError, KeyError) as exc:  # a record this version cannot read: give up now
            body, error = "", f"could not build the body: {exc}"[:_MAX_ERROR]
        else:
            status_code, error = self._send(delivery, body, started)
        delivered = status_code is not None and 200 <= status_code < 300
        next_at_ms: int | None = None
        if not delivered and body and number < self.settings.webhook_max_attempts:
            delay = retry_delay_s(number, base_s=self.settings.webhook_retry_base_s,
                                  max_s=self.settings.webhook_retry_max_s)
            next_at_ms = now_ms() + int(delay * 1000)
            deadline_ms = None if delivery.queued_ms is None else delivery.queued_ms + int(self.window_s * 1000)
            if deadline_ms is not None and next_at_ms > deadline_ms:  # it waited long for a courier
                next_at_ms = None
                reason = f"HTTP {status_code}" if error is None else error
                error = (f"{reason}; given up: the next attempt would come after the delivery's deadline "
                         f"{format_time(datetime.fromtimestamp(deadline_ms / 1000, UTC))}")[:_MAX_ERROR]
        outcome = "delivered" if delivered else ("retrying" if next_at_ms is not None else "failed")
        entry: dict[str, Any] = {
            "time": format_time(started),
            "event": EVENT_TYPES.get(delivery.event, delivery.event),
            "webhook_id": msg_id,
            "attempt": number,
            "status_code": status_code,
            "error": error,
            "outcome": outcome,
            "next_attempt_at": None if next_at_ms is None else format_time(
                datetime.fromtimestamp(next_at_ms / 1000, UTC)),
        }
        if delivery.megabatch is not None:
            entry["megabatch"] = delivery.megabatch.get("index")
        if not self.store.finish_attempt(delivery, token, entry, body=body, next_at_ms=next_at_ms):
            log.warning("courier: delivery %s: the claim expired during the attempt; not recorded", msg_id)
            return None
        level = logging.INFO if delivered else logging.WARNING
        log.log(level, "webhook %s (%s, job %s) attempt %d: %s", msg_id, entry["event"], delivery.job_id, number,
                status_code if error is None else error)
        return entry

    def _send(self, delivery: PendingDelivery, body: str, when: datetime) -> tuple[int | None, str | None]:
        """POST the signed body to an address vetted for this attempt; (status code, None) when the
        receiver answered, else (None, error)."""
        try:
            addresses = vetted_addresses(delivery.url, allow_private=self.settings.webhook_allow_private,
                                         timeout_s=self.settings.webhook_resolve_timeout_s)
        except Unresolvable as exc:
            return None, str(exc)[:_MAX_ERROR]
        except UnsafeUrl as exc:
            return None, f"refused: {exc}"[:_MAX_ERROR]
        owner = delivery.record_fields.get("owner")
        if owner is None:
            return None, "the job record has no owner"
        secret = self.store.webhook_secret(str(json.loads(owner)))
        signature = self._webhook(secret).sign(delivery.msg_id, when, body)
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.msg_id,
            "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": signature,
        }
        error = "no address"
        for address in addresses:  # the resolver's order; the next one only when one cannot be reached
            try:
                url, host, extensions = pinned_request(delivery.url, address)
                # Streamed and closed unread: only the status matters, whatever the receiver sends.
                with self._http.stream("POST", url, content=body.encode(), headers={**headers, **host},
                                       extensions=extensions) as response:
                    return response.status_code, None
            except httpx.TimeoutException:
                return None, f"timed out after {self.settings.webhook_timeout_s:g} s ({address})"
            except httpx.ConnectError as exc:
                error = f"ConnectError: {exc} ({address})"
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                return None, f"{type(exc).__name__}: {exc}"[:_MAX_ERROR]
        return None, error[:_MAX_ERROR]

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()


def start_courier(settings: Settings, celery_app: Celery | None = None, *, poll_s: float = 0.5) -> Courier | None:
    """Start the courier on its own Redis connection when ``celery_app``'s worker consumes the
    control queue (or no app is given); None otherwise, and (with an error in the log) when the
    ``webhooks`` extra is not installed: deliveries then wait in Redis for a courier that has it."""
    if celery_app is not None and CONTROL_QUEUE not in set(celery_app.amqp.queues.consume_from or {}):
        return None
    try:
        import standardwebhooks  # noqa: F401
    except ImportError:
        log.error("webhook courier not started: install the `webhooks` extra (standardwebhooks) on control workers")
        return None
    from worker.tasks import connect_store

    courier = Courier(connect_store(settings), settings, poll_s=poll_s)
    courier.start()
    log.info("webhook courier started: %d sending thread(s)", settings.webhook_concurrency)
    return courier
