"""worker/sink.py: engine events into the job's stream; a cancel or an interrupt stops the run."""

from __future__ import annotations

import pytest
import redis
from factories import epoch_ended
from worker_support import SPEC, events

from app_common.events import RunStarted
from app_common.store import JobStore
from app_engine.runner import StopRun
from worker.sink import CANCEL_REASON, RedisProgressSink


def test_events_are_appended_and_move_progress(store: JobStore) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    sink = RedisProgressSink(store, job.id)
    sink(RunStarted(megabatches=2, epochs=1))
    sink(epoch_ended(1, 1, epochs=1))
    assert [e["type"] for e in events(store, job.id)] == ["run_started", "epoch_ended"]
    assert sink.events_written == 2 and not sink.cancel_seen
    record = store.get_job(job.id)
    assert record is not None and record.progress.fraction == 0.5


def test_cancel_flag_stops_the_run_after_the_event(store: JobStore) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    store.transition(job.id, "running", allowed_from={"queued"})
    store.request_cancel(job.id)
    sink = RedisProgressSink(store, job.id)
    sink(RunStarted(megabatches=2, epochs=1))  # not a check point: no stop
    with pytest.raises(StopRun, match=CANCEL_REASON):
        sink(epoch_ended(1, 1, epochs=1))
    assert sink.cancel_seen
    assert [e["type"] for e in events(store, job.id)][-1] == "epoch_ended"  # written, then stopped


def test_interrupt_stops_without_writing(store: JobStore) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    sink = RedisProgressSink(store, job.id, interrupt=lambda: "lease lost")
    with pytest.raises(StopRun, match="lease lost"):
        sink(epoch_ended(1, 1))
    assert sink.interrupted == "lease lost" and events(store, job.id) == []


def test_redis_errors_drop_the_event_after_retries(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    calls: list[str] = []

    def failing_append(job_id: str, event: object) -> None:
        calls.append(job_id)
        raise redis.exceptions.ConnectionError("down")

    monkeypatch.setattr(store, "append_event", failing_append)
    sink = RedisProgressSink(store, job.id, append_retries=2, retry_delay_s=0.0)
    sink(RunStarted(megabatches=2, epochs=1))  # dropped, not raised: the run goes on
    assert len(calls) == 3 and sink.events_written == 0
