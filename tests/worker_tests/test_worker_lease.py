"""worker/lease.py: the heartbeat keeps the lease, notices a takeover and enforces the cancel grace period."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from worker_support import SPEC, events

from app_common.store import JobStore
from worker.lease import CANCEL_FORCED, LEASE_LOST, LeaseHeartbeat, acquire_lease, restart_hold_s


def test_heartbeat_keeps_the_lease_and_notices_a_takeover(store: JobStore) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    assert store.acquire_lease(job.id, "mine", 0.3)
    beat = LeaseHeartbeat(store, job.id, "mine", 0.3, cancel_grace_s=60.0)
    beat.start()
    try:
        time.sleep(1.0)  # three TTLs: only renewal keeps it alive
        assert store.lease_alive(job.id) and beat.interrupt_reason() is None
        store.release_lease(job.id, "mine")
        assert store.acquire_lease(job.id, "intruder", 30)
        beat.join(timeout=2)
        assert not beat.is_alive()
        assert beat.interrupt_reason() == LEASE_LOST
        assert store.redis.get(f"{store.prefix}:job:{job.id}:lease") == "intruder"
    finally:
        beat.stop()


def test_heartbeat_forces_cancel_after_grace_period(store: JobStore) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    assert store.transition(job.id, "running", allowed_from={"queued"})
    assert store.acquire_lease(job.id, "mine", 5)
    terminated = threading.Event()
    beat = LeaseHeartbeat(
        store, job.id, "mine", 5, cancel_grace_s=0.3, on_cancel_timeout=terminated.set, interval_s=0.1
    )
    beat.start()
    try:
        time.sleep(0.3)
        assert not terminated.is_set()  # no cancel asked: nothing happens
        store.request_cancel(job.id)
        asked = time.monotonic()
        assert terminated.wait(5)
        assert time.monotonic() - asked >= 0.3
        record = store.get_job(job.id)
        assert record is not None and record.status == "cancelled"
        assert beat.interrupt_reason() == CANCEL_FORCED
        assert events(store, job.id)[-1]["reason"] == "cancel grace period exceeded (0.3 s); run terminated"
    finally:
        beat.stop()


def test_heartbeat_stamps_heartbeat_at_and_runs_its_hook(store: JobStore) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    assert store.get_job(job.id).heartbeat_at is None  # type: ignore[union-attr]
    assert store.acquire_lease(job.id, "mine", 5)
    beats = threading.Semaphore(0)
    beat = LeaseHeartbeat(store, job.id, "mine", 5, cancel_grace_s=60.0, interval_s=0.1, on_beat=beats.release)
    beat.start()
    try:
        assert beats.acquire(timeout=5)  # the first beat comes at once
        first = store.get_job(job.id).heartbeat_at  # type: ignore[union-attr]
        assert first is not None
        assert beats.acquire(timeout=5) and beats.acquire(timeout=5)
        assert store.get_job(job.id).heartbeat_at > first  # type: ignore[union-attr, operator]
    finally:
        beat.stop()


def test_after_an_outage_longer_than_the_ttl_the_heartbeat_takes_the_free_lease_back(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    assert store.acquire_lease(job.id, "mine", 0.3)
    down = threading.Event()
    down.set()
    tries: list[float] = []
    real_heartbeat = store.heartbeat

    def heartbeat(job_id: str, token: str, ttl_s: float) -> bool:
        tries.append(time.monotonic())
        if down.is_set():
            raise redis.exceptions.ConnectionError("down")
        return real_heartbeat(job_id, token, ttl_s)

    monkeypatch.setattr(store, "heartbeat", heartbeat)
    flushed = threading.Event()
    beat = LeaseHeartbeat(store, job.id, "mine", 0.3, cancel_grace_s=60.0, interval_s=10.0, retry_s=0.05,
                          on_beat=flushed.set)
    beat.start()
    try:
        time.sleep(0.6)  # two TTLs without Redis: the lease expired
        assert not store.lease_alive(job.id) and beat.interrupt_reason() is None
        assert len(tries) >= 3  # retried every retry_s, not every interval
        down.clear()
        assert flushed.wait(5)  # back within a retry, and the hook (the sink's flush) ran
        assert store.redis.get(f"{store.prefix}:job:{job.id}:lease") == "mine"
        assert beat.interrupt_reason() is None and beat.is_alive()
    finally:
        beat.stop()


def test_after_an_outage_a_lease_taken_by_another_worker_stops_the_run(store: JobStore) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    assert store.acquire_lease(job.id, "intruder", 30)
    assert not store.heartbeat(job.id, "mine", 30)
    assert store.get_job(job.id).heartbeat_at is None  # type: ignore[union-attr]


def test_a_running_jobs_free_lease_is_left_alone_for_a_ttl_after_a_redis_restart(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = store.create_job("key_a", SPEC, queue="cpu")
    assert store.transition(running.id, "running", allowed_from={"queued"})
    queued = store.create_job("key_a", SPEC, queue="cpu")
    uptime: list[float | None] = [0.5]
    monkeypatch.setattr(store, "redis_uptime_s", lambda: uptime[0])
    assert restart_hold_s(store, running.id, 2.0) == 1.5  # its live worker may be about to re-take it
    assert restart_hold_s(store, queued.id, 2.0) == 0.0  # a first delivery waits for nothing
    uptime[0] = 2.0
    assert restart_hold_s(store, running.id, 2.0) == 0.0
    uptime[0] = None  # INFO refused: nothing known
    assert restart_hold_s(store, running.id, 2.0) == 0.0
    uptime[0] = 1.9
    started = time.monotonic()
    assert acquire_lease(store, running.id, "late", 2.0)
    assert time.monotonic() - started >= 0.1
