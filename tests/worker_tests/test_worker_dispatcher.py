"""worker/dispatcher.py without a Celery worker: slots bound what is handed out, the store's fair
order is kept, and a message for a finished job is marked revoked before the pool sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from celery.worker import state

from app_common.store import JobStore
from app_common.tasks import RUN_JOB_TASK
from worker.dispatcher import Dispatcher, direct_queue, drop_if_finished

SPEC = {"dataset": {"name": "digits"}}


@dataclass
class Sent:
    id: str


@dataclass
class FakeCelery:
    sent: list[tuple[str, list[str], str]] = field(default_factory=list)

    def send_task(self, name: str, args: list[str], queue: str) -> Sent:
        self.sent.append((name, args, queue))
        return Sent(id=f"task-{len(self.sent)}")


@dataclass
class FakeRequest:
    id: str
    args: list[Any]
    name: str = RUN_JOB_TASK


def submit(store: JobStore, owner: str, queue: str = "cpu") -> str:
    job = store.create_job(owner, SPEC, queue=queue)
    store.enqueue_job(queue, owner, job.id)
    return job.id


def make(store: JobStore, celery: FakeCelery, held: list[int], **kw: Any) -> Dispatcher:
    return Dispatcher(store, celery, queues=kw.get("queues", ["cpu"]), hostname="w1@host", slots=kw.get("slots", 1),
                      held=lambda: held[0], interval_s=0.05)  # type: ignore[arg-type]


def test_one_job_per_free_slot_to_its_own_queue(store: JobStore) -> None:
    a1, a2 = submit(store, "a"), submit(store, "a")
    b1 = submit(store, "b")
    celery, held = FakeCelery(), [0]
    dispatcher = make(store, celery, held)
    assert dispatcher.dispatch_once() == [a1]
    assert celery.sent == [(RUN_JOB_TASK, [a1], direct_queue("w1@host"))] and direct_queue("w1@host") == "w1@host.dq2"
    # Sent but not yet received: the slot is taken.
    assert dispatcher.dispatch_once() == []
    dispatcher.received("task-1")
    held[0] = 1  # the worker holds it now
    assert dispatcher.dispatch_once() == []
    held[0] = 0  # done: B (never served) before A's second job
    assert dispatcher.dispatch_once() == [b1]
    dispatcher.received("task-2")
    assert dispatcher.dispatch_once() == [a2]


def test_several_slots_and_queues(store: JobStore) -> None:
    cpu = [submit(store, "a") for _ in range(3)]
    gpu = submit(store, "b", queue="gpu")
    celery, held = FakeCelery(), [0]
    dispatcher = make(store, celery, held, slots=3, queues=["cpu", "gpu"])
    assert dispatcher.dispatch_once() == [cpu[0], gpu, cpu[1]]


def test_the_thread_dispatches_until_stopped(store: JobStore) -> None:
    job_id = submit(store, "a")
    celery, held = FakeCelery(), [0]
    dispatcher = make(store, celery, held)
    dispatcher.start()
    try:
        for _ in range(200):
            if celery.sent:
                break
            dispatcher._stop_event.wait(0.05)
    finally:
        dispatcher.stop()
    assert [args for _, args, _ in celery.sent] == [[job_id]] and not dispatcher.is_alive()


def test_a_message_for_a_finished_or_deleted_job_is_revoked(store: JobStore) -> None:
    cancelled, deleted, live = submit(store, "a"), submit(store, "a"), submit(store, "a")
    store.request_cancel(cancelled)
    store.request_cancel(deleted)
    store.delete_job(deleted)
    for job_id, dropped in ((cancelled, True), (deleted, True), (live, False)):
        request = FakeRequest(id=f"msg-{job_id}", args=[job_id])
        assert drop_if_finished(store, request) is dropped
        assert (request.id in state.revoked) is dropped
    assert drop_if_finished(store, FakeRequest(id="other", args=[cancelled], name="another.task")) is False
