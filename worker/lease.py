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
    a redelivery after a crash (take over) without waiting for the reaper. Right after a Redis
    restart a running job's lease is first left alone for the rest of a TTL (:func:`restart_hold_s`).
    """
    hold = restart_hold_s(store, job_id, ttl_s)
    if hold > 0:
        log.info("job %s: Redis restarted %.1f s ago; giving its worker %.1f s to renew the lease", job_id,
                 ttl_s - hold, hold)
        time.sleep(hold)
    deadline = time.monotonic() + wait_s
    poll = max(0.05, ttl_s / 10)
    while True:
        if store.acquire_lease(job_id, token, ttl_s):
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(poll, remaining))


def restart_hold_s(store: JobStore, job_id: str, ttl_s: float) -> float:
    """How long to leave a running job's free lease alone because Redis itself restarted less than
    a TTL ago: the lease may have expired during the outage while its worker lives on and is
    about to re-take it (Celery also hands the job's message out again when its connection
    drops). 0 for a queued job, or when Redis has been up for a TTL (or will not say)."""
    uptime = store.redis_uptime_s()
    if uptime is None or uptime >= ttl_s:
        return 0.0
    record = store.get_job(job_id)
    if record is None or record.status not in (RUNNING, CANCELLING):
        return 0.0
    return ttl_s - uptime


class LeaseHeartbeat(threading.Thread):
    """Renews the lease every ``ttl_s / 3`` and watches the cancel grace period.

    ``interrupt_reason()`` is what the progress sink polls: None while the run may go on,
    otherwise why it must stop (:data:`LEASE_LOST`, or :data:`CANCEL_FORCED` once the job was
    marked cancelled here).

    Each beat renews the lease, or re-acquires it when it expired without anyone else taking it
    (a long pause, a Redis outage longer than the TTL), and stamps the record's ``heartbeat_at``
    (:meth:`JobStore.heartbeat`, atomic); a lease held by another token means another worker owns
    the job now: the run stops and this worker must not write to the job any more. While Redis
    cannot be reached the beat is retried every ``retry_s`` (not every interval), so the lease is
    back within about ``retry_s`` of Redis answering: before the reaper, which waits one lease
    TTL after a Redis outage, would re-send the job. ``on_beat`` (the progress sink's flush) runs
    after each successful beat, so events buffered during an outage are written even while the
    engine is between events.

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
        retry_s: float = 0.5,
        on_beat: Callable[[], object] | None = None,
    ) -> None:
        super().__init__(name=f"lease-heartbeat-{job_id}", daemon=True)
        self.store = store
        self.job_id = job_id
        self.token = token
        self.ttl_s = ttl_s
        self.interval_s = interval_s if interval_s is not None else ttl_s / 3
        self.cancel_grace_s = cancel_grace_s
        self.on_cancel_timeout = on_cancel_timeout
        self.retry_s = min(retry_s, self.interval_s)
        self.on_beat = on_beat
        self._unreachable = False
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
        wait = 0.0  # the first beat at once: heartbeat_at is set as the run starts
        while not self._stop_event.wait(wait):
            try:
                if not self.store.heartbeat(self.job_id, self.token, self.ttl_s):
                    self._reason = LEASE_LOST
                    log.warning("job %s: %s; stopping this run", self.job_id, LEASE_LOST)
                    return
                if self._unreachable:
                    self._unreachable = False
                    log.warning("job %s: Redis answers again; lease renewed", self.job_id)
                wait = self.interval_s
                if self._cancel_overdue():
                    self._force_cancel()
                    return
            except RedisError as exc:
                if not self._unreachable:
                    self._unreachable = True
                    log.warning("job %s: heartbeat cannot reach Redis (%s); retrying every %g s",
                                self.job_id, exc, self.retry_s)
                wait = self.retry_s
                continue
            if self.on_beat is not None:
                try:
                    self.on_beat()
                except Exception:  # the hook must never end the heartbeat (and with it the lease)
                    log.exception("job %s: the heartbeat hook failed", self.job_id)

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
