"""JobStore against a real Redis (see conftest.py): records, lifecycle, events, histories,
leases, limits, idempotency and API keys."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest
import redis
from factories import epoch_ended, megabatch_ended, stored_metrics

import app_common.store.leases as leases_module
from app_common.events import MegabatchEnded, Pruned, RunStarted
from app_common.jobs import ArtifactInfo, Progress
from app_common.store import (
    InvalidCursor,
    JobNotFound,
    JobStore,
    TooManyActiveJobs,
    hash_secret,
    make_redis,
)

SPEC = {"dataset": {"name": "digits"}, "stream": {"megabatches": 4}, "training": {"epochs": 5}}


def keys_of(store: JobStore) -> set[str]:
    return set(store.redis.scan_iter(match=f"{store.prefix}:*"))


epoch_event = epoch_ended


def megabatch_event(m: int, acc: float, total: int = 4) -> MegabatchEnded:
    return megabatch_ended(m, total, test_accuracy=acc)


def pruned(m: int) -> Pruned:
    return Pruned(megabatch=m, target_density=0.5, density=0.5, pruner="snip")


def test_create_and_get(store: JobStore) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    assert len(job.id) == 32
    got = store.get_job(job.id)
    assert got == job
    assert got.status == "queued"
    assert got.owner == "key_a" and got.queue == "cpu" and got.spec == SPEC
    assert got.progress == Progress(megabatch=0, megabatches=4, epoch=0, epochs=5, fraction=0.0)
    assert got.attempt == 0 and got.artifacts == [] and got.cancel_requested is False
    assert got.started_at is None and got.finished_at is None
    assert got.created_at == got.updated_at
    assert store.count_by_status()["queued"] == 1


@pytest.mark.parametrize("bad", ["", "nope", "x:events", "0" * 31, "A" * 32, "../" * 11])
def test_ids_that_are_not_jobs(store: JobStore, bad: str) -> None:
    assert store.get_job(bad) is None
    assert store.request_cancel(bad) is None
    assert store.append_event(bad, pruned(1)) is None
    assert store.read_events(bad) == []
    assert store.delete_job(bad) is False
    assert store.transition(bad, "running", allowed_from={"queued"}) is False
    with pytest.raises(JobNotFound):
        store.next_attempt(bad)


def test_store_needs_decoded_responses(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with pytest.raises(ValueError, match="decode_responses"):
        JobStore(client)
    client.close()


def test_list_newest_first_with_cursor_and_filter(store: JobStore) -> None:
    ids = [store.create_job("key_a", SPEC, queue="cpu").id for _ in range(7)]
    store.create_job("key_b", SPEC, queue="cpu")
    # Several jobs share a millisecond here; the (score, id) cursor must still page exactly.
    pages, cursor = [], None
    while True:
        page, cursor = store.list_jobs("key_a", limit=3, cursor=cursor)
        pages.append([j.id for j in page])
        if cursor is None:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    flat = [i for p in pages for i in p]
    assert sorted(flat) == sorted(ids)
    created = [store.get_job(i).created_at for i in flat]
    assert created == sorted(created, reverse=True)
    # Equal scores are ordered by id (descending) so the order is total.
    expected = [m for m in store.redis.zrevrange(f"{store.prefix}:owner:key_a:jobs", 0, -1)]
    assert flat == expected

    store.transition(ids[2], "running", allowed_from={"queued"})
    store.transition(ids[5], "running", allowed_from={"queued"})
    newer, older = [i for i in expected if i in (ids[2], ids[5])]
    running, nxt = store.list_jobs("key_a", status="running", limit=1)
    assert [j.id for j in running] == [newer] and nxt is not None
    running2, nxt2 = store.list_jobs("key_a", status="running", limit=1, cursor=nxt)
    assert [j.id for j in running2] == [older] and nxt2 is None
    assert store.list_jobs("key_a", status="succeeded") == ([], None)
    assert store.list_jobs("key_c") == ([], None)
    exact, last = store.list_jobs("key_b", limit=1)
    assert len(exact) == 1 and last is None


HUGE_SCORE = base64.urlsafe_b64encode(b"[" + b"9" * 400 + b',"' + b"a" * 32 + b'"]').decode()


@pytest.mark.parametrize("cursor", ["garbage", "eyJ4IjoxfQ", "WzEsIm5vIl0", "%%%", "W10", "\u00e9t\u00e9", HUGE_SCORE])
def test_invalid_cursor(store: JobStore, cursor: str) -> None:
    with pytest.raises(InvalidCursor):
        store.list_jobs("key_a", cursor=cursor)


def test_unknown_status_filter(store: JobStore) -> None:
    with pytest.raises(ValueError):
        store.list_jobs("key_a", status="done")


def test_lifecycle_transitions_and_events(store: JobStore) -> None:
    job_id = store.create_job("key_a", SPEC, queue="cpu").id
    assert store.transition(job_id, "succeeded", allowed_from={"running"}) is False
    assert store.transition(job_id, "running", allowed_from={"queued"}) is True
    running = store.get_job(job_id)
    assert running.status == "running" and running.started_at is not None
    assert store.running_jobs() == [job_id]
    assert store.transition(job_id, "running", allowed_from={"queued"}) is False  # second delivery
    assert store.transition(job_id, "failed", reason="out of memory", allowed_from={"running"}) is True
    failed = store.get_job(job_id)
    assert failed.status == "failed" and failed.error == "out of memory"
    assert failed.finished_at is not None and failed.started_at is not None
    assert failed.finished_at >= failed.started_at
    # Terminal statuses never change, whatever the caller allows.
    assert store.transition(job_id, "running", allowed_from={"failed", "queued"}) is False
    assert store.get_job(job_id).status == "failed"
    events = store.read_events(job_id)
    assert [e["status"] for _, e in events] == ["running", "failed"]
    assert events[1][1] == {"type": "status_changed", "status": "failed", "reason": "out of memory"}
    assert store.count_by_status() == {
        "queued": 0, "running": 0, "cancelling": 0, "succeeded": 0, "failed": 1, "cancelled": 0,
    }
    assert store.running_jobs() == []
    with pytest.raises(ValueError):
        store.transition(job_id, "done", allowed_from={"queued"})


def test_transition_is_atomic_under_races(store: JobStore) -> None:
    job_id = store.create_job("key_a", SPEC, queue="cpu").id
    wins: list[bool] = []

    def deliver() -> None:
        wins.append(store.transition(job_id, "running", allowed_from={"queued"}))

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]
    assert len(store.read_events(job_id)) == 1


def test_cancel(store: JobStore) -> None:
    queued = store.create_job("key_a", SPEC, queue="cpu").id
    record = store.request_cancel(queued)
    assert record.status == "cancelled" and record.cancel_requested is True
    assert record.finished_at is not None

    running = store.create_job("key_a", SPEC, queue="cpu").id
    store.transition(running, "running", allowed_from={"queued"})
    record = store.request_cancel(running)
    assert record.status == "cancelling" and record.cancel_requested is True
    assert running in store.running_jobs()
    assert store.count_active("key_a") == 1
    assert store.transition(running, "cancelled", reason="stopped", allowed_from={"cancelling", "running"})
    assert store.count_active("key_a") == 0
    record = store.request_cancel(running)  # terminal: unchanged
    assert record.status == "cancelled" and record.error is None
    types = [e["status"] for _, e in store.read_events(running)]
    assert types == ["running", "cancelling", "cancelled"]
    assert store.request_cancel("f" * 32) is None


def test_events_progress_and_history(store: JobStore) -> None:
    job_id = store.create_job("key_a", SPEC, queue="cpu").id
    store.transition(job_id, "running", allowed_from={"queued"})
    start = store.append_event(job_id, RunStarted(megabatches=4, epochs=5, resumed_after=1))
    assert store.get_job(job_id).progress.fraction == 0.25
    ids = [start]
    # Epoch 10 after epoch 9: the history must sort numerically, not as strings.
    for e in (1, 2):
        ids.append(store.append_event(job_id, epoch_event(2, e)))
    progress = store.get_job(job_id).progress
    assert progress == Progress(megabatch=2, megabatches=4, epoch=2, epochs=5, fraction=0.35)
    ids.append(store.append_event(job_id, megabatch_event(2, 0.9)))
    job = store.get_job(job_id)
    assert job.progress.fraction == 0.5 and job.latest_metrics == stored_metrics(2, test_accuracy=0.9)
    # A redelivered job replays megabatch 2: dropped, first write wins.
    assert store.append_event(job_id, megabatch_event(2, 0.1)) is None
    ids.append(store.append_event(job_id, megabatch_event(1, 0.8)))
    ids.append(store.append_event(job_id, epoch_event(10, 10, epochs=10, loss=float("nan"))))
    ids.append(store.append_event(job_id, epoch_event(10, 9, epochs=10)))
    assert all(ids) and len(set(ids)) == len(ids)

    events = store.read_events(job_id)
    assert [i for i, _ in events][1:] == ids  # the first entry is status_changed(running)
    assert [e["type"] for _, e in events] == [
        "status_changed", "run_started", "epoch_ended", "epoch_ended",
        "megabatch_ended", "megabatch_ended", "epoch_ended", "epoch_ended",
    ]
    assert events[6][1]["train_loss"] is None  # NaN stored as null: strict JSON on the wire
    after = store.read_events(job_id, after=ids[2], count=2)
    assert [i for i, _ in after] == ids[3:5]

    hist = store.history(job_id)
    assert [m["megabatch"] for m in hist["megabatches"]] == [1, 2]
    assert hist["megabatches"][1]["test_accuracy"] == 0.9
    assert [(e["megabatch"], e["epoch"]) for e in hist["epochs"]] == [(2, 1), (2, 2), (10, 9), (10, 10)]
    assert "type" not in hist["epochs"][0]
    assert store.history("0" * 32) == {"megabatches": [], "epochs": []}
    with pytest.raises(ValueError):
        store.append_event(job_id, {"megabatch": 1})  # type: ignore[arg-type]


def test_read_events_blocks_until_timeout_or_entry(store: JobStore) -> None:
    job_id = store.create_job("key_a", SPEC, queue="cpu").id
    t0 = time.monotonic()
    assert store.read_events(job_id, block_ms=200) == []
    assert 0.15 < time.monotonic() - t0 < 2.0
    timer = threading.Timer(0.1, store.append_event, args=(job_id, pruned(1)))
    timer.start()
    got = store.read_events(job_id, block_ms=3000)
    timer.join()
    assert [e["type"] for _, e in got] == ["pruned"]


def test_event_stream_is_bounded(redis_client: redis.Redis, key_prefix: str) -> None:
    store = JobStore(redis_client, prefix=key_prefix, events_maxlen=100)
    job_id = store.create_job("key_a", SPEC, queue="cpu").id
    for i in range(600):
        store.append_event(job_id, pruned(i))
    length = redis_client.xlen(store.events_key(job_id))
    # MAXLEN ~ trims whole radix-tree nodes (100 entries by default): approximately 100.
    assert 100 <= length <= 300


def test_events_for_deleted_job_are_dropped(store: JobStore) -> None:
    job_id = store.create_job("key_a", SPEC, queue="cpu").id
    assert store.delete_job(job_id) is True
    assert store.append_event(job_id, epoch_event(1, 1)) is None
    assert keys_of(store) == set()


def test_leases(store: JobStore) -> None:
    job_id = store.create_job("key_a", SPEC, queue="cpu").id
    assert store.acquire_lease(job_id, "w1", 5) is True
    assert store.acquire_lease(job_id, "w2", 5) is False
    assert store.lease_alive(job_id)
    assert store.renew_lease(job_id, "w2", 5) is False
    assert store.renew_lease(job_id, "w1", 0.15) is True
    store.release_lease(job_id, "w2")  # not the holder: no effect
    assert store.lease_alive(job_id)
    time.sleep(0.25)
    assert not store.lease_alive(job_id)  # the holder died: the lease expired
    assert store.renew_lease(job_id, "w1", 5) is False
    assert store.acquire_lease(job_id, "w2", 5) is True
    store.release_lease(job_id, "w2")
    assert not store.lease_alive(job_id)


def test_leases_and_reap_claims_are_read_in_batches(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reaper's reads and claims: one pipeline per BATCH jobs, the same answers as one by one."""
    ids = [store.create_job("key_a", SPEC, queue="cpu").id for _ in range(5)]
    assert store.acquire_lease(ids[1], "w1", 5)
    assert store.claim_reap(ids[2], 60)
    monkeypatch.setattr(leases_module, "BATCH", 2)
    pipelines = []
    execute = redis.client.Pipeline.execute

    def counted(self: redis.client.Pipeline, raise_on_error: bool = True) -> list[object]:
        pipelines.append(len(self.command_stack))
        return execute(self, raise_on_error)

    monkeypatch.setattr(redis.client.Pipeline, "execute", counted)
    assert store.leases_alive(ids) == {job_id: job_id == ids[1] for job_id in ids}
    assert pipelines == [2, 2, 1]
    assert store.claim_reaps(ids, 60) == set(ids) - {ids[2]}
    assert store.claim_reaps(ids, 60) == set()  # claimed for the window: a second pass gets none
    assert pipelines == [2, 2, 1] * 3
    assert store.leases_alive([]) == {} and store.claim_reaps([], 60) == set() and len(pipelines) == 9
    assert all(not store.claim_reap(job_id, 60) for job_id in ids)


def test_stream_slots_are_one_count_per_key_with_leases(store: JobStore, redis_url: str) -> None:
    """Two API processes (two clients on one Redis) share each key's cap; a holder that dies frees
    its slots when their leases end; a renewal re-takes a lapsed lease and notices a revocation."""
    other = JobStore(make_redis(redis_url), prefix=store.prefix)
    owner, secret = store.create_key("streams")
    digest = hash_secret(secret)
    try:
        assert store.acquire_stream_slot(owner, "a1", 3, 5)
        assert other.acquire_stream_slot(owner, "b1", 3, 5)
        assert store.acquire_stream_slot(owner, "dies", 3, 0.2)  # a process that never gives it back
        assert not other.acquire_stream_slot(owner, "b2", 3, 5)  # 3 open, whichever process counts
        assert store.acquire_stream_slot("key_other", "x", 3, 5)  # another key is unaffected
        assert store.open_streams(owner) == other.open_streams(owner) == 3
        store.release_stream_slot(owner, "a1")
        assert other.acquire_stream_slot(owner, "b2", 3, 5)
        assert not other.acquire_stream_slot(owner, "b3", 3, 5)
        time.sleep(0.3)  # the dead holder's lease ended: its slot is free again
        assert store.open_streams(owner) == 2
        assert other.acquire_stream_slot(owner, "b3", 3, 5)
        # A renewal extends; one after the lease lapsed (a stalled process) takes the slot again.
        assert store.renew_stream_slot(owner, "b1", 5, digest)
        assert store.acquire_stream_slot(owner, "slow", 4, 0.1)
        time.sleep(0.2)
        assert store.open_streams(owner) == 3
        assert store.renew_stream_slot(owner, "slow", 5, digest) and store.open_streams(owner) == 4
        # Revoked: the renewal says so and gives the slot back; without a digest nothing is checked.
        assert store.revoke_key(owner)
        assert not store.renew_stream_slot(owner, "slow", 5, digest)
        assert store.open_streams(owner) == 3
        assert store.renew_stream_slot(owner, "b1", 5)
        # Every slot given back (or lapsed): the key's zset expires with its last lease.
        for slot in ("b1", "b2", "b3"):
            other.release_stream_slot(owner, slot)
        assert store.redis.exists(f"{store.prefix}:streams:{owner}") == 0
        assert store.redis.pttl(f"{store.prefix}:streams:key_other") <= 5000
        with pytest.raises(ValueError, match="invalid owner"):
            store.acquire_stream_slot("bad owner", "x", 3, 5)
    finally:
        other.close()


def test_heartbeat_renews_or_retakes_a_free_lease_and_stamps_the_record(store: JobStore) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    assert store.get_job(job.id).heartbeat_at is None  # type: ignore[union-attr]
    assert store.acquire_lease(job.id, "w1", 0.05)
    time.sleep(0.1)  # expired (a Redis outage longer than the TTL): nobody else took it
    assert store.heartbeat(job.id, "w1", 30)
    assert store.redis.pttl(f"{store.prefix}:job:{job.id}:lease") > 25_000
    stamped = store.get_job(job.id).heartbeat_at  # type: ignore[union-attr]
    assert stamped is not None
    assert not store.heartbeat(job.id, "w2", 30)  # held by w1: w2 lost it
    assert store.get_job(job.id).heartbeat_at == stamped  # type: ignore[union-attr]
    store.delete_job(job.id)
    assert store.heartbeat(job.id, "w3", 30)  # deleted: nothing to hold, and nothing created again
    assert not keys_of(store)


def test_a_running_job_without_a_live_lease_is_stale(store: JobStore) -> None:
    running = store.create_job("key_a", SPEC, queue="cpu")
    queued = store.create_job("key_a", SPEC, queue="cpu")
    done = store.create_job("key_a", SPEC, queue="cpu")
    for job in (running, done):
        assert store.transition(job.id, "running", allowed_from={"queued"})
    assert store.transition(done.id, "succeeded", allowed_from={"running"})
    assert store.acquire_lease(running.id, "w1", 30)

    def stale() -> dict[str, bool]:
        listed = {r.id: r.stale for r in store.list_jobs("key_a")[0]}
        fetched = {r.id: r.stale for r in store.get_jobs([running.id, queued.id, done.id])}
        one = {j.id: store.get_job(j.id).stale for j in (running, queued, done)}  # type: ignore[union-attr]
        assert listed == fetched == one
        return one

    assert stale() == {running.id: False, queued.id: False, done.id: False}
    store.release_lease(running.id, "w1")  # its worker is gone
    assert stale() == {running.id: True, queued.id: False, done.id: False}
    store.request_cancel(running.id)  # cancelling, and still nobody to finish it
    assert store.get_job(running.id).stale  # type: ignore[union-attr]
    assert store.acquire_lease(running.id, "w2", 30)  # resumed by another worker
    assert stale() == {running.id: False, queued.id: False, done.id: False}
    # Derived, never stored.
    assert "stale" not in store.redis.hgetall(f"{store.prefix}:job:{running.id}")


def test_lost_events_are_counted_on_the_record(store: JobStore) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    assert store.get_job(job.id).events_lost == 0  # type: ignore[union-attr]
    store.record_lost_events(job.id, 3)
    store.record_lost_events(job.id, 2)
    assert store.get_job(job.id).events_lost == 5  # type: ignore[union-attr]
    store.delete_job(job.id)
    store.record_lost_events(job.id, 1)
    assert store.get_job(job.id) is None and not keys_of(store)


def test_attempts_and_result(store: JobStore) -> None:
    job_id = store.create_job("key_a", SPEC, queue="cpu").id
    assert [store.next_attempt(job_id) for _ in range(3)] == [1, 2, 3]
    artifacts = [ArtifactInfo(name="model.safetensors", format="safetensors", bytes=10, sha256="ab" * 32)]
    store.set_result(job_id, {"cer": 3, "final_test_accuracy": 0.91}, artifacts)
    job = store.get_job(job_id)
    assert job.attempt == 3 and job.result["cer"] == 3 and job.artifacts == artifacts
    missing = "e" * 32
    with pytest.raises(JobNotFound):
        store.next_attempt(missing)
    with pytest.raises(JobNotFound):
        store.set_result(missing, {}, [])
    assert keys_of(store) == {
        f"{store.prefix}:job:{job_id}",
        f"{store.prefix}:owner:key_a:jobs",
        f"{store.prefix}:owner:key_a:active",
        f"{store.prefix}:jobs:status:queued",
    }


def test_delete_removes_everything(store: JobStore) -> None:
    keep = store.create_job("key_a", SPEC, queue="cpu").id
    job_id = store.create_job("key_a", SPEC, queue="cpu").id
    store.transition(job_id, "running", allowed_from={"queued"})
    store.acquire_lease(job_id, "w", 30)
    store.append_event(job_id, epoch_event(1, 1))
    store.append_event(job_id, megabatch_event(1, 0.5))
    assert store.delete_job(job_id) is True
    assert store.get_job(job_id) is None and store.delete_job(job_id) is False
    assert not any(job_id in k for k in keys_of(store))
    assert [j.id for j in store.list_jobs("key_a")[0]] == [keep]
    assert store.count_by_status()["running"] == 0 and store.count_active("key_a") == 1


def test_active_job_limit(store: JobStore) -> None:
    first = store.create_job("key_a", SPEC, queue="cpu", max_active=2).id
    store.create_job("key_a", SPEC, queue="cpu", max_active=2)
    with pytest.raises(TooManyActiveJobs):
        store.create_job("key_a", SPEC, queue="cpu", max_active=2)
    store.create_job("key_b", SPEC, queue="cpu", max_active=2)  # per owner
    store.request_cancel(first)
    store.create_job("key_a", SPEC, queue="cpu", max_active=2)
    assert store.count_active("key_a") == 2
    assert len(store.list_jobs("key_a")[0]) == 3


def test_idempotency_records(store: JobStore) -> None:
    assert store.reserve_idempotency("key_a", "k-1", "fp1", 60) is None
    assert store.reserve_idempotency("key_a", "k-1", "fp1", 60) == {"fingerprint": "fp1", "response": None}
    assert store.reserve_idempotency("key_b", "k-1", "fp2", 60) is None  # keys are per owner
    store.complete_idempotency("key_a", "k-1", "fp1", {"status_code": 202, "body": {"id": "x"}}, 60)
    assert store.reserve_idempotency("key_a", "k-1", "other", 60)["response"]["body"] == {"id": "x"}
    store.release_idempotency("key_b", "k-1")
    assert store.reserve_idempotency("key_b", "k-1", "fp3", 60) is None
    with pytest.raises(ValueError):
        store.reserve_idempotency("key_a", "has space", "fp", 60)


def test_api_keys(store: JobStore) -> None:
    key_id, secret = store.create_key("ci")
    other_id, other_secret = store.create_key("laptop")
    assert store.owner_for_secret(secret) == key_id
    assert store.owner_for_secret(other_secret) == other_id
    assert store.owner_for_secret(secret + "x") is None
    listed = store.list_keys()
    assert {k["key_id"] for k in listed} == {key_id, other_id}
    assert all(set(k) == {"key_id", "name", "created_at"} for k in listed)
    raw = json.dumps(store.redis.hgetall(f"{store.prefix}:keys"))
    assert secret not in raw and other_secret not in raw  # only the sha256 is stored
    assert store.revoke_key(key_id) is True
    assert store.revoke_key(key_id) is False
    assert store.owner_for_secret(secret) is None
    assert store.owner_for_secret(other_secret) == other_id


def test_unreachable_redis_fails_fast() -> None:
    # Port 1 on localhost is closed: connection refused at once, no retries.
    store = JobStore(make_redis("redis://127.0.0.1:1/0", timeout_s=0.5))
    t0 = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError):
        store.ping()
    with pytest.raises(redis.exceptions.ConnectionError):
        store.get_job("a" * 32)
    assert time.monotonic() - t0 < 2.0


def test_cancel_flag_is_read_without_the_whole_record(store: JobStore) -> None:
    job = store.create_job("key_a", {"training": {"epochs": 1}}, queue="cpu")
    assert store.cancel_requested(job.id) is False
    store.request_cancel(job.id)
    assert store.cancel_requested(job.id) is True
    store.delete_job(job.id)
    assert store.cancel_requested(job.id) is None
    assert store.cancel_requested("not-a-job-id") is None
