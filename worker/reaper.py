"""Re-enqueue jobs whose worker died.

When a pool child dies, Celery puts its message back (``reject_on_worker_lost``). When the whole
worker dies (its main process is killed, the machine is lost), the message stays in Redis's
"unacked" set until the visibility timeout, hours later. The job record still says ``running``
but nobody renews its lease; :func:`reap_orphans` finds such jobs and sends the task again. The
lease check in :func:`worker.job.execute_job` makes any duplicate delivery harmless.

Every worker runs the reaper in a daemon thread of its main process (it needs only Redis, never
torch); a short-lived claim key per job keeps several reapers from sending the same job
together.

After a Redis outage (the reaper could not reach it, or Redis itself restarted less than a lease
TTL ago) every lease may have expired while its worker lived on: the reaper then re-sends
nothing for one lease TTL, the time a live worker's heartbeat needs to renew (or re-take) its
lease, so an outage never causes a second delivery of a job whose worker is alive.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from celery import Celery
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app_common.events import CANCELLING, QUEUED, RUNNING
from app_common.jobs import JobRecord
from app_common.settings import Settings
from app_common.store import JobStore
from app_common.tasks import RUN_JOB_TASK
from app_common.webhooks import delivery_window_s

log = logging.getLogger(__name__)


def reap_window_s(settings: Settings) -> float:
    """How long a re-enqueued job is left alone before it may be re-enqueued again.

    The new message may wait in the queue behind other jobs while the lease stays expired; ten
    lease TTLs (5 minutes by default) bounds the duplicates such a wait produces to one per
    window, each of which stands down at once.
    """
    return max(10.0 * float(settings.job_lease_ttl_s), 1.0)


def _orphan_candidates(store: JobStore) -> list[str]:
    """Jobs a worker has started and must still be holding a lease on.

    Running and cancelling jobs, plus queued jobs whose attempt counter shows a delivery: a worker
    that died after counting its attempt but before marking the job running leaves it queued,
    with its message unacked until the visibility timeout.
    """
    return sorted({*store.running_jobs(), *store.job_ids_with_status(QUEUED)})


def reap_orphans(store: JobStore, celery_app: Celery, settings: Settings) -> list[str]:
    """Send ``anytime_prune.run_job`` again for every started job with an expired lease.

    Returns the ids of the jobs re-enqueued by this call. Redis is read in batches (every lease,
    then the records of the jobs without one, then the claims), not job by job.
    """
    window_s = reap_window_s(settings)
    candidates = _orphan_candidates(store)
    # Lease first, record second: a job that finishes in between is then seen terminal.
    alive = store.leases_alive(candidates)
    unleased = [job_id for job_id in candidates if not alive[job_id]]
    records = {record.id: record for record in store.get_jobs(unleased)}
    orphans = []
    for job_id in unleased:
        record = records.get(job_id)
        if record is None or record.status not in (QUEUED, RUNNING, CANCELLING):
            continue
        if record.status == QUEUED and not record.attempt:
            continue  # never delivered yet: its message is still waiting in the queue
        orphans.append(record)
    reaped = _send_claimed(store, celery_app, settings, orphans, window_s,
                           "its worker stopped renewing the lease; re-enqueued")
    return reaped + _resend_lost_dispatches(store, celery_app, settings, window_s)


def _send_claimed(store: JobStore, celery_app: Celery, settings: Settings, records: list[JobRecord],
                  window_s: float, why: str, *, forget_sent: bool = False) -> list[str]:
    """Send ``run_job`` again for each of ``records`` this reaper claims (another reaper, or this
    one earlier, may have claimed some within the window); ids of those sent, in order. When the
    broker fails part-way, the claims of those not yet sent are given back, so the next pass tries
    them rather than a whole reap window later."""
    claimed = store.claim_reaps([record.id for record in records], window_s)
    sent: list[str] = []
    try:
        for record in records:
            if record.id not in claimed:
                continue
            queue = record.queue or settings.default_queue
            celery_app.send_task(RUN_JOB_TASK, args=[record.id], queue=queue)
            claimed.discard(record.id)
            if forget_sent:
                store.forget_sent(record.id)
            log.warning("job %s: %s on %s", record.id, why, queue)
            sent.append(record.id)
    except BaseException:
        with contextlib.suppress(RedisError):
            store.release_reaps(sorted(claimed))
        raise
    return sent


def _resend_lost_dispatches(store: JobStore, celery_app: Celery, settings: Settings, window_s: float) -> list[str]:
    """Jobs the dispatcher handed to a worker a reap window ago that never started (never counted
    an attempt): that worker died with the message. Sent again on the job's training queue."""
    sent = store.sent_jobs(older_than_s=window_s)
    records = {record.id: record for record in store.get_jobs(sent)}
    waiting = []
    for job_id in sent:
        record = records.get(job_id)
        if record is None or record.status != QUEUED or record.attempt:
            store.forget_sent(job_id)  # started (the checks above cover it from now on), or over
            continue
        waiting.append(record)
    alive = store.leases_alive([record.id for record in waiting])
    lost = [record for record in waiting if not alive[record.id]]
    return _send_claimed(store, celery_app, settings, lost, window_s,
                         "handed to a worker that never started it; re-sent", forget_sent=True)


class ReaperThread(threading.Thread):
    """Calls :func:`reap_orphans` every ``interval_s`` until stopped; errors are logged, not fatal.

    Holds off for one lease TTL after Redis comes back (see the module's docstring)."""

    def __init__(self, store: JobStore, celery_app: Celery, settings: Settings, interval_s: float) -> None:
        super().__init__(name="job-reaper", daemon=True)
        self.store = store
        self.celery_app = celery_app
        self.settings = settings
        self.interval_s = interval_s
        self._stop_event = threading.Event()
        self._unreachable = False
        self._hold_until = 0.0  # monotonic: no re-sending before this

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.reap_once()

    def reap_once(self) -> list[str]:
        """One pass: :func:`reap_orphans`, unless Redis came back less than a lease TTL ago.
        Errors are logged (an unreachable Redis once per outage), never raised."""
        try:
            return self._reap()
        except (RedisError, OSError) as exc:
            if not self._unreachable:
                log.warning("reaper: Redis unreachable (%s); trying again every %.0f s", exc, self.interval_s)
            self._unreachable = True
        except Exception:  # a reaper that dies silently would leave orphans forever
            log.exception("reaper: unexpected error")
        return []

    def _reap(self) -> list[str]:
        ttl = float(self.settings.job_lease_ttl_s)
        now = time.monotonic()
        if self._unreachable:
            self.store.ping()
            self._unreachable = False
            self._hold_until = now + ttl
            log.warning("reaper: Redis answers again; re-sending nothing for %.0f s while workers renew leases", ttl)
        # Webhook deliveries past their deadline are given up here too: the outbox stays bounded
        # where no courier runs (a control worker without the `webhooks` extra, or none at all).
        try:
            self.store.expire_deliveries(delivery_window_s(self.settings))
        except (RedisConnectionError, RedisTimeoutError, OSError):
            raise  # Redis unreachable: the pass stops here, as below
        except Exception:  # noqa: BLE001 -- a delivery it cannot give up must not stop the re-sending below
            log.exception("reaper: giving up expired webhook deliveries failed")
        # A restart this reaper did not notice (it fell between two passes) expired leases too.
        uptime = self.store.redis_uptime_s()
        if uptime is not None and uptime < ttl:
            self._hold_until = max(self._hold_until, now + ttl - uptime)
        if now < self._hold_until:
            return []
        return reap_orphans(self.store, self.celery_app, self.settings)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)


def start_reaper(celery_app: Celery, settings: Settings, *, interval_s: float | None = None) -> ReaperThread:
    """Start the reaper thread (every lease TTL by default) on its own Redis connection."""
    from worker.tasks import connect_store

    interval = float(settings.job_lease_ttl_s) if interval_s is None else interval_s
    thread = ReaperThread(connect_store(settings), celery_app, settings, interval)
    thread.start()
    log.info("reaper started: checking for orphaned jobs every %.0f s", interval)
    return thread
