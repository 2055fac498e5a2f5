"""worker/lease.py: the heartbeat keeps the lease, notices a takeover and enforces the cancel grace period."""

from __future__ import annotations

import threading
import time

from worker_support import SPEC, events

from app_common.store import JobStore
from worker.lease import CANCEL_FORCED, LEASE_LOST, LeaseHeartbeat


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
