"""The job lease: taken before a job runs, renewed by a heartbeat thread while it runs.

Celery on Redis delivers at least once, so two workers can hold the same job. The lease
(``{prefix}:job:{id}:lease``, a random token with a TTL) decides which one runs it: the holder
renews it every ``ttl / 3`` seconds; a second delivery that finds the lease kept alive stands
down; a dead worker stops renewing, its lease expires, and the next delivery takes over and
resumes from the last megabatch checkpoint.

The heartbeat also enforces the cancel grace period: cancellation is cooperative (the sink stops
the run at the next epoch boundary), but an epoch can be long, so a job still running
``cancel_grace_s`` after the heartbeat first saw its cancel flag is marked cancelled and its run
terminated (see :class:`LeaseHeartbeat`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from app_common.events import CANCELLED, CANCELLING, RUNNING
from app_common.store import JobStore

log = logging.getLogger(__name__)

LEASE_LOST = "lease lost: another worker took over the job"
CANCEL_FORCED = "cancel grace period exceeded"


def acquire_lease(store: JobStore, job_id: str, token: str, ttl_s: float, *, wait_s: float = 0.0) -> bool:
    """Take the lease, waiting up to ``wait_s`` for a lease that is no longer renewed to expire.

    A live holder renews its lease every ``ttl / 3`` seconds, so it never expires while we wait
    one TTL; the lease of a worker that died (its pool child was killed and Celery redelivered
    the message at once) does. Waiting one TTL therefore tells a real duplicate (stand down) from
    a redelivery after a crash (take over) without waiting for the reaper.
    """
    deadline = time.monotonic() + wait_s
    poll = max(0.05, ttl_s / 10)
    while True:
        if store.acquire_lease(job_id, token, ttl_s):
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(poll, remaining))


class LeaseHeartbeat(threading.Thread):
    """Renews the lease every ``ttl_s / 3`` and watches the cancel grace period.

    ``interrupt_reason()`` is what the progress sink polls: None while the run may go on,
    otherwise why it must stop (:data:`LEASE_LOST`, or :data:`CANCEL_FORCED` once the job was
    marked cancelled here).

    Renewal that fails because the lease expired without anyone else taking it (a long pause)
    re-acquires it; renewal that fails because another token holds it means another worker owns
    the job now: the run stops and this worker must not write to the job any more. Redis errors
    are retried at the next beat (the lease outlives two missed beats).

    When the job has had its cancel flag set for ``cancel_grace_s`` (measured from the first beat
    that saw it), the heartbeat marks it cancelled itself and calls ``on_cancel_timeout``: the
    Celery task passes a function that ends the pool child process (the only way to stop a run
    in the middle of an epoch); called directly (tests, in-process use) it is None and the run
    stops at its next event.
    """

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        token: str,
        ttl_s: float,
        *,
        cancel_grace_s: float,
        on_cancel_timeout: Callable[[], None] | None = None,
        interval_s: float | None = None,
    ) -> None:
        super().__init__(name=f"lease-heartbeat-{job_id}", daemon=True)
        self.store = store
        self.job_id = job_id
        self.token = token
        self.ttl_s = ttl_s
        self.interval_s = interval_s if interval_s is not None else ttl_s / 3
        self.cancel_grace_s = cancel_grace_s
        self.on_cancel_timeout = on_cancel_timeout
        self._stop_event = threading.Event()
        self._reason: str | None = None
        self._cancel_seen_at: float | None = None

    def interrupt_reason(self) -> str | None:
        return self._reason

    @property
    def lease_lost(self) -> bool:
        return self._reason == LEASE_LOST

    @property
    def cancel_forced(self) -> bool:
        return self._reason == CANCEL_FORCED

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=self.interval_s + 5)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                if not self._renew():
                    self._reason = LEASE_LOST
                    log.warning("job %s: %s; stopping this run", self.job_id, LEASE_LOST)
                    return
                if self._cancel_overdue():
                    self._force_cancel()
                    return
            except RedisError as exc:
                log.warning("job %s: heartbeat could not reach Redis (%s); retrying", self.job_id, exc)

    def _renew(self) -> bool:
        if self.store.renew_lease(self.job_id, self.token, self.ttl_s):
            return True
        # Expired but free (nobody else took it): ours again. Held by another token: lost.
        return self.store.acquire_lease(self.job_id, self.token, self.ttl_s)

    def _cancel_overdue(self) -> bool:
        if not self.store.cancel_requested(self.job_id):
            return False
        now = time.monotonic()
        if self._cancel_seen_at is None:
            self._cancel_seen_at = now
        return now - self._cancel_seen_at >= self.cancel_grace_s

    def _force_cancel(self) -> None:
        reason = f"{CANCEL_FORCED} ({self.cancel_grace_s:g} s); run terminated"
        if not self.store.transition(self.job_id, CANCELLED, reason=reason, allowed_from={RUNNING, CANCELLING}):
            # The run reached a terminal status on its own in the meantime: nothing to force.
            return
        self._reason = CANCEL_FORCED
        log.warning("job %s: %s", self.job_id, reason)
        if self.on_cancel_timeout is not None:
            self.on_cancel_timeout()
