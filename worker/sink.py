"""Engine events -> the job's Redis stream; a cancel request -> :class:`StopRun`.

The sink is one of the engine's callbacks (``run(..., callbacks=[sink])``). It never changes a
job's status: it only appends events and tells the engine to stop; the caller decides what the
stop means (cancelled, or the lease was lost to another worker).

Redis may be unreachable for a while (a restart, a failover, a network cut) while the run goes
on: the sink then keeps the events in a bounded buffer, in order, and writes them once Redis
answers again, from the next event or from the lease heartbeat (:meth:`RedisProgressSink.flush`),
so the engine never waits on Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from redis.exceptions import RedisError

from app_common.events import EpochEnded, Event, MegabatchEnded
from app_common.store import JobStore
from app_engine.runner import StopRun

log = logging.getLogger(__name__)

# Events after which the cancel flag is read: an HGET per epoch is negligible next to an epoch,
# and the engine acts on a StopRun only at its next epoch boundary anyway.
CANCEL_CHECK_EVENTS = frozenset({"pruned", "epoch_ended", "megabatch_ended"})
CANCEL_REASON = "cancel requested"

# 10,000 events are about 3 MB of Python objects: hours of epochs of a typical run.
BUFFER_LIMIT = 10_000
# How long the end of a run waits for Redis to take the buffered events before the delivery
# fails (and is retried by Celery, resuming from the last checkpoint).
DRAIN_TIMEOUT_S = 300.0


class RedisProgressSink:
    """Append every engine event to the job's stream; stop the run when it is cancelled.

    ``interrupt`` is polled before each event: a non-None reason (the lease was lost, the run was
    terminated after the cancel grace period) stops the run *without* writing the event, because
    the job is no longer this worker's to report on.

    An event that cannot be written (Redis unreachable) goes to a buffer of at most
    ``buffer_limit`` events, written in order before any later event. While the buffer is not
    empty the engine's thread tries Redis at most every ``retry_delay_s`` (an unreachable host can
    take a whole socket timeout per try) and the cancel flag is not read (unknown is not
    "cancelled"). A full buffer drops its oldest ``epoch_ended`` (then its oldest event other
    than ``megabatch_ended``, never a ``megabatch_ended``: the per-megabatch history stays
    complete) and the record's ``events_lost`` counts what was dropped.

    Thread-safe: the heartbeat thread calls :meth:`flush` after each renewal.
    """

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        *,
        interrupt: Callable[[], str | None] | None = None,
        buffer_limit: int = BUFFER_LIMIT,
        retry_delay_s: float = 1.0,
    ) -> None:
        if buffer_limit < 1:
            raise ValueError("buffer_limit must be positive")
        self.store = store
        self.job_id = job_id
        self.interrupt = interrupt
        self.buffer_limit = buffer_limit
        self.retry_delay_s = retry_delay_s
        self.cancel_seen = False
        self.interrupted: str | None = None
        self.events_written = 0
        self.events_dropped = 0
        self._pending: deque[Event] = deque()
        self._dropped_unrecorded = 0  # dropped, not yet added to the record's events_lost
        self._buffer_lock = threading.Lock()  # the deque and the counters: held briefly
        self._flush_lock = threading.Lock()  # one writer at a time keeps the stream in order
        self._failed_at: float | None = None  # monotonic time of the last failed write; None: Redis fine

    @property
    def buffered(self) -> int:
        return len(self._pending)

    def __call__(self, event: Event) -> None:
        reason = self.interrupt() if self.interrupt is not None else None
        if reason is not None:
            self.interrupted = reason
            raise StopRun(reason)
        self._enqueue(event)
        if self._failed_at is None or time.monotonic() - self._failed_at >= self.retry_delay_s:
            # Never block the engine behind another thread's flush: that one writes this event too.
            self.flush(blocking=False)
        if event.type in CANCEL_CHECK_EVENTS and self._failed_at is None and self._cancel_requested():
            self.cancel_seen = True
            raise StopRun(CANCEL_REASON)

    def flush(self, *, blocking: bool = True) -> bool:
        """Write the buffered events in order; True when the buffer is empty afterwards.

        With ``blocking=False`` returns False at once when another thread is flushing."""
        if not self._flush_lock.acquire(blocking=blocking):
            return False
        try:
            return self._flush_locked()
        finally:
            self._flush_lock.release()

    def drain(self, timeout_s: float, *, poll_s: float = 0.5) -> bool:
        """Flush until the buffer is empty, ``timeout_s`` passed, or ``interrupt`` gives a reason
        (then the buffer is discarded); True when everything was written. For the end of a run:
        the final status must not overtake the run's events."""
        deadline = time.monotonic() + timeout_s
        while not self.flush():
            if self.interrupt is not None and self.interrupt() is not None:
                self.discard()  # the job is no longer ours to report on
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
        return True

    def discard(self) -> int:
        """Forget the buffered events (the job is no longer this worker's); returns how many."""
        with self._buffer_lock:
            count = len(self._pending)
            self._pending.clear()
        if count:
            log.warning("job %s: discarded %d buffered events: the job is no longer ours", self.job_id, count)
        return count

    def _enqueue(self, event: Event) -> None:
        with self._buffer_lock:
            self._pending.append(event)
            if len(self._pending) > self.buffer_limit and self._drop_one():
                self.events_dropped += 1
                self._dropped_unrecorded += 1
                if self.events_dropped == 1:
                    log.error(
                        "job %s: event buffer full (%d events); dropping the oldest epoch events",
                        self.job_id, self.buffer_limit,
                    )

    def _drop_one(self) -> bool:
        """Drop the oldest epoch_ended, else the oldest event that is not a megabatch_ended.
        (Epoch events are most of the buffer, so the scan ends near its front.)"""
        for kinds in ((EpochEnded,), None):
            for index, queued in enumerate(self._pending):
                if (isinstance(queued, kinds) if kinds else not isinstance(queued, MegabatchEnded)):
                    del self._pending[index]
                    return True
        return False  # only megabatch_ended events: keep them all, over the bound

    def _flush_locked(self) -> bool:
        written = 0
        while True:
            with self._buffer_lock:
                if not self._pending:
                    break
                event = self._pending[0]
            try:
                self.store.append_event(self.job_id, event)
            except RedisError as exc:
                if self._failed_at is None:
                    log.warning(
                        "job %s: Redis unreachable (%s); buffering events until it answers", self.job_id, exc
                    )
                self._failed_at = time.monotonic()
                return False
            with self._buffer_lock:
                # discard() may have emptied the buffer meanwhile.
                if self._pending and self._pending[0] is event:
                    self._pending.popleft()
            written += 1
            self.events_written += 1
        if self._failed_at is not None:
            self._failed_at = None
            log.warning("job %s: Redis answers again; wrote %d buffered events in order", self.job_id, written)
        return self._record_drops()

    def _record_drops(self) -> bool:
        with self._buffer_lock:
            count, self._dropped_unrecorded = self._dropped_unrecorded, 0
        if not count:
            return True
        try:
            self.store.record_lost_events(self.job_id, count)
        except RedisError:
            with self._buffer_lock:
                self._dropped_unrecorded += count
            return False
        log.warning("job %s: %d events were dropped during the outage (recorded as events_lost)", self.job_id, count)
        return True

    def _cancel_requested(self) -> bool:
        if self.cancel_seen:
            return True
        try:
            flag = self.store.cancel_requested(self.job_id)
        except RedisError as exc:
            # Unknown is not "cancelled": keep training and look again after the next epoch.
            log.warning("job %s: could not read the cancel flag (%s)", self.job_id, exc)
            return False
        # A job deleted under the run counts as cancelled.
        return flag is None or flag
