"""Fair dispatch in a training worker's main process.

The API does not send ``run_job`` to a shared FIFO queue any more: it puts the job on its key's
queue in the store (:mod:`app_common.store.queues`). Each training worker's main process runs a
:class:`Dispatcher` thread that, whenever the worker has a free slot, pops the next job (keys take
turns, least recently served first) and sends ``run_job`` to this worker's own direct queue
(Celery's ``worker_direct``: ``{hostname}.dq2``). So a job is handed out only to a worker that can
start it now, and the order in which jobs start is the store's fair order, whatever one key
queued or cancelled before.

A worker still consumes its training queue (``cpu`` / ``gpu``): the reaper re-sends orphaned jobs
there, and any idle worker may take them.

:func:`drop_if_finished` is the other half of "a cancelled job costs nothing": a ``run_job``
message whose job is already finished or deleted (a late redelivery) is discarded in the main
process, as a revoked task, before a pool child is forked for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery
from redis.exceptions import RedisError

from app_common.settings import Settings
from app_common.store import JobStore
from app_common.tasks import QUEUE_NAMES, RUN_JOB_TASK

log = logging.getLogger(__name__)

# A message sent to our own queue counts as a used slot until the worker receives it, or for this
# long (a message that never arrives must not block the worker for ever).
IN_FLIGHT_TIMEOUT_S = 30.0


def direct_queue(hostname: str) -> str:
    """The name of Celery's direct queue of the worker ``hostname`` (``worker_direct``)."""
    from celery.utils.nodenames import worker_direct

    return str(worker_direct(hostname).name)


class Dispatcher(threading.Thread):
    """Every ``interval_s``: while ``held()`` (requests the worker holds) plus the messages sent
    and not yet received is below ``slots``, pop the next job of ``queues`` and send it to
    ``hostname``'s direct queue."""

    def __init__(
        self,
        store: JobStore,
        celery_app: Celery,
        *,
        queues: Sequence[str],
        hostname: str,
        slots: int,
        held: Callable[[], int],
        interval_s: float,
    ) -> None:
        super().__init__(name="job-dispatcher", daemon=True)
        self.store = store
        self.celery_app = celery_app
        self.queues = list(queues)
        self.hostname = hostname
        self.slots = slots
        self.held = held
        self.interval_s = interval_s
        self._in_flight: dict[str, float] = {}  # task id -> monotonic time sent
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._next_queue = 0

    def received(self, task_id: str) -> None:
        """The worker received the message ``task_id`` (it now counts in ``held()``)."""
        with self._lock:
            self._in_flight.pop(task_id, None)

    def free_slots(self) -> int:
        now = time.monotonic()
        with self._lock:
            for task_id, sent in list(self._in_flight.items()):
                if now - sent > IN_FLIGHT_TIMEOUT_S:
                    log.warning("dispatcher: message %s never arrived; counting its slot free", task_id)
                    del self._in_flight[task_id]
            in_flight = len(self._in_flight)
        return self.slots - self.held() - in_flight

    def dispatch_once(self) -> list[str]:
        """Hand out jobs while slots are free; returns the job ids sent."""
        sent: list[str] = []
        while self.free_slots() > 0:
            job_id = self._pop()
            if job_id is None:
                break
            result = self.celery_app.send_task(RUN_JOB_TASK, args=[job_id], queue=direct_queue(self.hostname))
            with self._lock:
                self._in_flight[str(result.id)] = time.monotonic()
            log.info("dispatcher: job %s to %s", job_id, self.hostname)
            sent.append(job_id)
        return sent

    def _pop(self) -> str | None:
        # Several training queues (a worker on cpu and gpu): take them in turn.
        for offset in range(len(self.queues)):
            queue = self.queues[(self._next_queue + offset) % len(self.queues)]
            job_id = self.store.pop_next_job(queue)
            if job_id is not None:
                self._next_queue = (self._next_queue + offset + 1) % len(self.queues)
                return job_id
        return None

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                self.dispatch_once()
            except (RedisError, OSError) as exc:
                log.warning("dispatcher: Redis unreachable (%s); trying again", exc)
            except Exception:  # a dispatcher that dies silently would leave every job queued
                log.exception("dispatcher: unexpected error")

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)


def held_requests() -> int:
    """Requests this worker process holds (received and not finished): Celery's own bookkeeping
    in the main process (``task_reserved`` adds, ``task_ready`` removes)."""
    from celery.worker import state

    return len(state.requests)


def drop_if_finished(store: JobStore, request: Any) -> bool:
    """For a ``run_job`` request just received by the main process: when its job is finished or
    gone, mark the request revoked so Celery acknowledges it without forking a child; True then.

    Redis errors keep the message (the child decides, as before)."""
    if getattr(request, "name", None) != RUN_JOB_TASK:
        return False
    args = getattr(request, "args", None) or ()
    job_id = args[0] if args else None
    if not isinstance(job_id, str):
        return False
    try:
        record = store.get_job(job_id)
        if record is None or record.terminal:
            store.forget_sent(job_id)
    except RedisError as exc:
        log.warning("job %s: could not read it before running (%s); letting the run decide", job_id, exc)
        return False
    if record is not None and not record.terminal:
        return False
    from celery.worker import state

    state.revoked.add(request.id)
    log.info("job %s: %s; message dropped without running", job_id, "gone" if record is None else record.status)
    return True


def start_dispatcher(celery_app: Celery, settings: Settings, consumer: Any) -> Dispatcher | None:
    """Start the dispatcher of the worker whose Celery consumer is ``consumer`` (the sender of
    ``worker_ready``), on its own Redis connection; None for a worker without a training queue
    (the control worker)."""
    from worker.tasks import connect_store

    consumed = set(celery_app.amqp.queues.consume_from or {})
    queues = [queue for queue in QUEUE_NAMES if queue in consumed]
    if not queues:
        return None
    controller = getattr(consumer, "controller", None)
    slots = int(getattr(controller, "concurrency", None) or 1)
    thread = Dispatcher(
        connect_store(settings), celery_app, queues=queues, hostname=str(consumer.hostname), slots=slots,
        held=held_requests, interval_s=settings.dispatch_interval_s,
    )
    thread.start()
    log.info("dispatcher started: %d slot(s) on %s for queue(s) %s", slots, consumer.hostname, ", ".join(queues))
    return thread
