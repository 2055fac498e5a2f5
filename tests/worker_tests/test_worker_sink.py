"""worker/sink.py: engine events into the job's stream; a cancel or an interrupt stops the run; a Redis
outage buffers the events, in order, within a bound that never drops a megabatch_ended."""

from __future__ import annotations

import logging

import pytest
import redis
from factories import epoch_ended, megabatch_ended
from worker_support import SPEC, events

from app_common.events import Event, RunStarted
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


class Outage:
    """``store.append_event`` (and the cancel flag) failing while ``down`` is set, as when Redis
    is unreachable; counts the attempts."""

    def __init__(self, store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.down = True
        self.attempts = 0
        real_append, real_cancel = store.append_event, store.cancel_requested

        def append_event(job_id: str, event: Event) -> str | None:
            self.attempts += 1
            if self.down:
                raise redis.exceptions.ConnectionError("down")
            return real_append(job_id, event)

        def cancel_requested(job_id: str) -> bool | None:
            if self.down:
                raise redis.exceptions.ConnectionError("down")
            return real_cancel(job_id)

        monkeypatch.setattr(store, "append_event", append_event)
        monkeypatch.setattr(store, "cancel_requested", cancel_requested)


def test_redis_outage_buffers_events_and_writes_them_in_order(
    store: JobStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    store.transition(job.id, "running", allowed_from={"queued"})
    store.request_cancel(job.id)  # unknown during the outage: not a reason to stop
    outage = Outage(store, monkeypatch)
    sink = RedisProgressSink(store, job.id, retry_delay_s=0.0)
    sent = [RunStarted(megabatches=2, epochs=2), epoch_ended(1, 1, epochs=2), epoch_ended(1, 2, epochs=2),
            megabatch_ended(1, total=2)]
    with caplog.at_level(logging.WARNING, logger="worker.sink"):
        for event in sent:
            sink(event)  # neither raises nor waits: the run goes on
        assert sink.buffered == 4 and sink.events_written == 0 and events(store, job.id)[-1]["type"] == "status_changed"
        assert not sink.flush()
        outage.down = False
        # The next event writes the buffer first, then itself; the cancel flag is read again.
        with pytest.raises(StopRun, match=CANCEL_REASON):
            sink(epoch_ended(2, 1, epochs=2))
    assert sink.buffered == 0 and sink.events_written == 5
    kinds = [e["type"] for e in events(store, job.id) if e["type"] != "status_changed"]
    assert kinds == ["run_started", "epoch_ended", "epoch_ended", "megabatch_ended", "epoch_ended"]
    assert [(e["megabatch"], e["epoch"]) for e in store.history(job.id)["epochs"]] == [(1, 1), (1, 2), (2, 1)]
    assert [m["megabatch"] for m in store.history(job.id)["megabatches"]] == [1]
    # One line when buffering starts, one when it drains; not one per event.
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "buffering" in messages[0] and "wrote 5 buffered events in order" in messages[1]
    record = store.get_job(job.id)
    assert record is not None and record.events_lost == 0


def test_while_redis_is_down_the_engine_thread_tries_it_at_most_every_retry_delay(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    outage = Outage(store, monkeypatch)
    sink = RedisProgressSink(store, job.id, retry_delay_s=3600.0)
    for epoch in range(1, 6):
        sink(epoch_ended(1, epoch))
    assert outage.attempts == 1 and sink.buffered == 5
    outage.down = False
    assert sink.flush()  # the heartbeat's flush does not wait for the delay
    assert sink.buffered == 0 and len(store.history(job.id)["epochs"]) == 5


def test_full_buffer_drops_oldest_epoch_events_never_megabatch_ended_and_records_the_gap(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    outage = Outage(store, monkeypatch)
    sink = RedisProgressSink(store, job.id, buffer_limit=4, retry_delay_s=0.0)
    sink(RunStarted(megabatches=3, epochs=2))
    for m in (1, 2, 3):
        sink(epoch_ended(m, 1, epochs=2))
        sink(epoch_ended(m, 2, epochs=2))
        sink(megabatch_ended(m, total=3))
    # 10 events into 4 places: the 6 epoch events went first, oldest first.
    assert sink.buffered == 4 and sink.events_dropped == 6
    outage.down = False
    assert sink.flush()
    kinds = [e["type"] for e in events(store, job.id)]
    assert kinds == ["run_started", "megabatch_ended", "megabatch_ended", "megabatch_ended"]
    assert [m["megabatch"] for m in store.history(job.id)["megabatches"]] == [1, 2, 3]
    record = store.get_job(job.id)
    assert record is not None and record.events_lost == 6 and record.progress.fraction == 1.0


def test_only_megabatch_events_are_kept_past_the_bound(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    outage = Outage(store, monkeypatch)
    sink = RedisProgressSink(store, job.id, buffer_limit=2, retry_delay_s=0.0)
    sink(RunStarted(megabatches=3, epochs=1))
    for m in (1, 2, 3):
        sink(megabatch_ended(m, total=3))
    assert sink.buffered == 3 and sink.events_dropped == 1  # run_started went; no megabatch did
    outage.down = False
    assert sink.drain(5.0)
    assert [m["megabatch"] for m in store.history(job.id)["megabatches"]] == [1, 2, 3]


def test_drain_stops_and_discards_when_the_job_is_no_longer_ours(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    Outage(store, monkeypatch)
    reason: list[str] = []
    sink = RedisProgressSink(store, job.id, interrupt=lambda: reason[0] if reason else None, retry_delay_s=0.0)
    sink(epoch_ended(1, 1))
    reason.append("lease lost")
    assert not sink.drain(60.0, poll_s=0.01)
    assert sink.buffered == 0
