"""worker/reaper.py: jobs whose worker died are sent again, once per window."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
import redis
from worker_support import SPEC

import worker.reaper as reaper_module
from app_common.settings import Settings
from app_common.store import JobStore
from app_common.tasks import RUN_JOB_TASK
from worker.celery_app import make_celery
from worker.reaper import ReaperThread, reap_orphans


def queued_tasks(client: redis.Redis, queue: str, job_ids: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """Messages for ``job_ids`` waiting in a Celery queue, as (raw entry, envelope).

    kombu's Redis transport keeps a queue as a list of JSON envelopes whose ``body`` is the
    base64 of ``[args, kwargs, embed]``.
    """
    found = []
    for raw in client.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        args = json.loads(base64.b64decode(envelope["body"]))[0]
        if args and args[0] in job_ids:
            found.append((str(raw), envelope))
    return found


def test_reaper_requeues_running_jobs_with_expired_leases(store: JobStore, settings: Settings) -> None:
    app = make_celery(settings)
    orphan = store.create_job("key_a", SPEC, queue="gpu")
    alive = store.create_job("key_a", SPEC, queue="gpu")
    queued = store.create_job("key_a", SPEC, queue="gpu")
    # Delivered once (attempt counted) but its worker died before marking it running.
    stuck = store.create_job("key_a", SPEC, queue="gpu")
    store.next_attempt(stuck.id)
    ids = {orphan.id, alive.id, queued.id, stuck.id}
    for job in (orphan, alive):
        store.next_attempt(job.id)
        assert store.transition(job.id, "running", allowed_from={"queued"})
    assert store.acquire_lease(alive.id, "live-worker", 60)
    gpu_queue = f"{settings.celery_key_prefix}gpu"
    try:
        assert sorted(reap_orphans(store, app, settings)) == sorted([orphan.id, stuck.id])
        sent = queued_tasks(store.redis, gpu_queue, ids)
        assert len(sent) == 2
        resent = set()
        for _, envelope in sent:
            assert envelope["headers"]["task"] == RUN_JOB_TASK
            args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
            assert kwargs == {}
            resent.add(args[0])
            assert envelope["properties"]["delivery_info"]["routing_key"] == "gpu"
        assert resent == {orphan.id, stuck.id}
        # Re-enqueued once per window, not at every pass of the reaper.
        assert reap_orphans(store, app, settings) == []
        assert len(queued_tasks(store.redis, gpu_queue, ids)) == 2
        assert store.get_job(queued.id).status == "queued"  # type: ignore[union-attr]
        assert store.get_job(orphan.id).status == "running"  # type: ignore[union-attr]
    finally:
        app.close()


def test_after_redis_comes_back_the_reaper_gives_workers_one_lease_ttl(
    store: JobStore, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis outage longer than the TTL expires every lease while the workers live on: the
    reaper re-sends nothing until they had one TTL to renew, counted from its own reconnect or
    from a Redis restart it did not notice."""
    app = make_celery(settings)
    orphan = store.create_job("key_a", SPEC, queue="gpu")
    store.next_attempt(orphan.id)
    assert store.transition(orphan.id, "running", allowed_from={"queued"})
    reaper = ReaperThread(store, app, settings, interval_s=3600)  # passes run by hand
    clock = [1000.0]
    monkeypatch.setattr(reaper_module.time, "monotonic", lambda: clock[0])
    uptime = [3600.0]
    down = [True]

    def redis_uptime_s() -> float:
        if down[0]:
            raise redis.exceptions.ConnectionError("down")
        return uptime[0]

    monkeypatch.setattr(store, "redis_uptime_s", redis_uptime_s)
    try:
        assert reaper.reap_once() == []  # Redis unreachable: logged, not raised
        down[0] = False
        assert reaper.reap_once() == []  # back: the lease has a TTL to be renewed
        clock[0] += settings.job_lease_ttl_s - 0.5
        assert reaper.reap_once() == []
        clock[0] += 1.0
        assert reaper.reap_once() == [orphan.id]  # nobody renewed it in a whole TTL: its worker is gone
        # A restart between two passes (Redis up for less than a TTL) holds the reaper as well.
        store.redis.delete(f"{store.prefix}:job:{orphan.id}:reaped")
        uptime[0] = 0.5
        assert reaper.reap_once() == []
        clock[0] += settings.job_lease_ttl_s
        uptime[0] += settings.job_lease_ttl_s
        assert reaper.reap_once() == [orphan.id]
    finally:
        app.close()


def test_a_delivery_the_expiry_cannot_read_neither_stops_the_reaper_nor_stays_forever(
    store: JobStore, settings: Settings
) -> None:
    """Giving up webhook deliveries is a side task of the reaper pass: a delivery whose stored
    megabatch is not what the store wrote (here a JSON list) must not keep orphaned jobs from being
    sent again, pass after pass; it is given up like any other delivery past its deadline."""
    from factories import megabatch_ended

    from app_common.jobs import Notify
    from app_common.webhooks import delivery_window_s

    short = settings.model_copy(update={"webhook_max_attempts": 1, "webhook_timeout_s": 0.01,
                                        "webhook_resolve_timeout_s": 0.01})
    notify = Notify.model_validate({"url": "http://127.0.0.1:9/hook", "events": ["megabatch"]})
    orphan = store.create_job("key_a", SPEC, queue="gpu", notify=notify)
    store.next_attempt(orphan.id)
    assert store.transition(orphan.id, "running", allowed_from={"queued"})  # no lease: its worker died
    store.append_event(orphan.id, megabatch_ended(1))
    [msg_id] = store.redis.zrange(store.names.webhook_due, 0, -1)
    store.redis.hset(store.names.webhook_message(msg_id), "megabatch", "[1]")
    deadline = time.monotonic() + delivery_window_s(short)
    # Past the delivery's deadline (20 ms), and past the hold of a Redis restarted less than a
    # lease TTL ago (a test Redis just started for this test alone).
    def held() -> bool:
        uptime = store.redis_uptime_s()
        return uptime is not None and uptime < short.job_lease_ttl_s

    while time.monotonic() <= deadline or held():
        time.sleep(0.01)
    app = make_celery(short)
    try:
        reaper = ReaperThread(store, app, short, interval_s=3600)  # passes run by hand
        assert reaper.reap_once() == [orphan.id]
        assert store.pending_deliveries() == 0
        [entry] = store.delivery_attempts(orphan.id)
        assert entry["outcome"] == "failed" and entry["error"].startswith("expired:")
    finally:
        app.close()


def test_jobs_not_sent_when_the_broker_fails_part_way_are_sent_at_the_next_pass(
    store: JobStore, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass claims every orphan first, then sends them one by one. When the broker fails after
    the first send, the claims of the jobs not sent are given back: the next pass sends them (not
    a whole reap window later), and the one already sent is not sent twice."""
    app = make_celery(settings)
    orphans = []
    for _ in range(3):
        job = store.create_job("key_a", SPEC, queue="gpu")
        store.next_attempt(job.id)
        assert store.transition(job.id, "running", allowed_from={"queued"})
        orphans.append(job.id)
    real_send = app.send_task
    sends: list[str] = []
    failed: list[str] = []

    def flaky_send(name: str, args: list[str], **kwargs: Any) -> Any:
        if len(sends) == 1 and not failed:
            failed.append(args[0])
            raise ConnectionError("broker went away")  # the second send of the first pass fails
        sends.append(args[0])
        return real_send(name, args=args, **kwargs)

    monkeypatch.setattr(app, "send_task", flaky_send)
    try:
        with pytest.raises(ConnectionError):
            reap_orphans(store, app, settings)
        assert len(sends) == 1
        again = reap_orphans(store, app, settings)  # the broker is back (the next send succeeds)
        assert sorted(again) == sorted(set(orphans) - {sends[0]})
        assert sorted(sends) == sorted(orphans)  # each sent exactly once
        assert reap_orphans(store, app, settings) == []
    finally:
        app.close()
