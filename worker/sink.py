"""Engine events -> the job's Redis stream; a cancel request -> :class:`StopRun`.

The sink is one of the engine's callbacks (``run(..., callbacks=[sink])``). It never changes a
job's status: it only appends events and tells the engine to stop; the caller decides what the
stop means (cancelled, or the lease was lost to another worker).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from app_common.events import Event
from app_common.store import JobStore
from app_engine.runner import StopRun

log = logging.getLogger(__name__)

# Events after which the cancel flag is read: an HGET per epoch is negligible next to an epoch,
# and the engine acts on a StopRun only at its next epoch boundary anyway.
CANCEL_CHECK_EVENTS = frozenset({"pruned", "epoch_ended", "megabatch_ended"})
CANCEL_REASON = "cancel requested"


class RedisProgressSink:
    """Append every engine event to the job's stream; stop the run when it is cancelled.

    ``interrupt`` is polled before each event: a non-None reason (the lease was lost, the run was
    terminated after the cancel grace period) stops the run *without* writing the event, because
    the job is no longer this worker's to report on.

    A Redis error while appending is retried ``append_retries`` times ``retry_delay_s`` apart and
    then logged and dropped: losing one progress event is better than failing an hour-long run for
    a Redis blip (the job's result, stored at the end, still holds every megabatch's metrics).
    """

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        *,
        interrupt: Callable[[], str | None] | None = None,
        append_retries: int = 3,
        retry_delay_s: float = 0.5,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.interrupt = interrupt
        self.append_retries = append_retries
        self.retry_delay_s = retry_delay_s
        self.cancel_seen = False
        self.interrupted: str | None = None
        self.events_written = 0

    def __call__(self, event: Event) -> None:
        reason = self.interrupt() if self.interrupt is not None else None
        if reason is not None:
            self.interrupted = reason
            raise StopRun(reason)
        self._append(event)
        if event.type in CANCEL_CHECK_EVENTS and self._cancel_requested():
            self.cancel_seen = True
            raise StopRun(CANCEL_REASON)

    def _append(self, event: Event) -> None:
        for attempt in range(self.append_retries + 1):
            try:
                self.store.append_event(self.job_id, event)
                self.events_written += 1
                return
            except RedisError as exc:
                if attempt == self.append_retries:
                    log.warning(
                        "job %s: dropped %s event after %d tries (%s)", self.job_id, event.type, attempt + 1, exc
                    )
                    return
                time.sleep(self.retry_delay_s)

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
