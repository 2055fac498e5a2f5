"""app_common/store/queues.py: per-key queues served least recently served key first, on a real Redis."""

from __future__ import annotations

import threading

from app_common.store import JobStore

SPEC = {"dataset": {"name": "digits"}}


def submit(store: JobStore, owner: str, queue: str = "cpu") -> str:
    job = store.create_job(owner, SPEC, queue=queue)
    store.enqueue_job(queue, owner, job.id)
    return job.id


def drain(store: JobStore, queue: str = "cpu") -> list[str]:
    out = []
    while (job_id := store.pop_next_job(queue)) is not None:
        out.append(job_id)
    return out


def test_a_key_never_served_goes_before_a_backlog(store: JobStore) -> None:
    first = submit(store, "a")
    assert store.pop_next_job("cpu") == first  # a's job runs
    backlog = [submit(store, "a") for _ in range(5)]
    late = submit(store, "b")
    # b submitted after all of a's backlog, and still goes next.
    assert drain(store) == [late, *backlog]


def test_keys_with_work_take_turns(store: JobStore) -> None:
    a = [submit(store, "a") for _ in range(3)]
    b = [submit(store, "b") for _ in range(2)]
    c = [submit(store, "c")]
    assert drain(store) == [a[0], b[0], c[0], a[1], b[1], a[2]]
    assert store.pop_next_job("cpu") is None and store.queued_count("cpu") == 0


def test_cancelled_and_deleted_jobs_are_skipped_or_removed(store: JobStore) -> None:
    a = [submit(store, "a") for _ in range(4)]
    store.request_cancel(a[0])  # cancelled but left on the list: the pop skips it
    store.request_cancel(a[1])
    assert store.unqueue_job("cpu", "a", a[1])  # what the API does
    store.request_cancel(a[2])
    store.delete_job(a[2])
    assert store.queued_job_ids("cpu", "a") == [a[0], a[2], a[3]]
    assert drain(store) == [a[3]]
    assert store.queued_job_ids("cpu", "a") == []


def test_a_key_whose_queue_emptied_by_cancels_is_not_served(store: JobStore) -> None:
    a = submit(store, "a")
    store.request_cancel(a)
    assert store.unqueue_job("cpu", "a", a)
    assert store.pop_next_job("cpu") is None
    assert not store.unqueue_job("cpu", "a", a)
    b = submit(store, "b")
    assert drain(store) == [b]


def test_queues_are_separate(store: JobStore) -> None:
    gpu = submit(store, "a", queue="gpu")
    cpu = submit(store, "a")
    assert drain(store, "gpu") == [gpu] and drain(store) == [cpu]


def test_popped_jobs_are_remembered_until_forgotten(store: JobStore) -> None:
    job_id = submit(store, "a")
    assert store.sent_jobs() == []
    assert store.pop_next_job("cpu") == job_id
    assert store.sent_jobs() == [job_id] and store.sent_jobs(older_than_s=60) == []
    store.forget_sent(job_id)
    assert store.sent_jobs() == []


def test_concurrent_pops_hand_out_each_job_once(store: JobStore) -> None:
    ids = {submit(store, owner) for owner in ("a", "b", "c", "d") for _ in range(10)}
    got: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        while (job_id := store.pop_next_job("cpu")) is not None:
            with lock:
                got.append(job_id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(got) == sorted(ids)
