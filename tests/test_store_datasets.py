"""Dataset records in the JobStore against a real Redis (see conftest.py): create, read, list with
cursors, compare-and-set status moves, ready/invalid, delete refused while active jobs use it."""

from __future__ import annotations

import threading

import pytest
from pydantic import ValidationError

from app_common.datasets import DatasetInfo, DatasetRecord
from app_common.store import DatasetInUse, InvalidCursor, JobStore

SHA = "ab" * 32
INFO = DatasetInfo(train_samples=80, test_samples=20, num_classes=2, classes=["a", "b"], input_shape=[1, 8, 8])


def make(store: JobStore, owner: str = "key_a", name: str = "my data", fmt: str = "npz") -> DatasetRecord:
    return store.create_dataset(owner, name=name, format=fmt, sha256=SHA, bytes=1234)


def test_create_and_read_back(store: JobStore) -> None:
    record = make(store)
    assert record.status == "uploading" and record.error is None and record.info is None
    assert len(record.id) == 32 and record.owner == "key_a" and record.bytes == 1234
    assert store.get_dataset(record.id) == record
    assert store.get_dataset("f" * 32) is None
    assert store.get_dataset("../x") is None  # never reaches a key name


@pytest.mark.parametrize(
    ("field", "value"),
    [("name", ""), ("name", "x" * 201), ("format", "digits"), ("sha256", "AB" * 32), ("sha256", "ab"), ("bytes", 0)],
)
def test_create_refuses_bad_fields(store: JobStore, field: str, value: object) -> None:
    fields: dict[str, object] = {"name": "n", "format": "npz", "sha256": SHA, "bytes": 10} | {field: value}
    with pytest.raises(ValidationError):
        store.create_dataset("key_a", **fields)  # type: ignore[arg-type]
    assert store.list_datasets("key_a") == ([], None)


def test_status_moves_are_compare_and_set(store: JobStore) -> None:
    record = make(store)
    assert not store.move_dataset(record.id, "validating", allowed_from={"validating"})
    assert store.move_dataset(record.id, "validating", allowed_from={"uploading"})
    assert not store.move_dataset(record.id, "validating", allowed_from={"uploading"})
    assert not store.move_dataset("0" * 32, "validating", allowed_from={"uploading"})
    with pytest.raises(ValueError, match="unknown"):
        store.move_dataset(record.id, "done", allowed_from={"uploading"})
    after = store.get_dataset(record.id)
    assert after is not None and after.status == "validating" and after.updated_at >= record.updated_at


def test_only_one_of_concurrent_moves_wins(store: JobStore) -> None:
    record = make(store)
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def move() -> None:
        barrier.wait()
        wins.append(store.move_dataset(record.id, "validating", allowed_from={"uploading"}))

    threads = [threading.Thread(target=move) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]


def test_ready_and_invalid(store: JobStore) -> None:
    ok, bad = make(store), make(store)
    assert not store.set_dataset_ready(ok.id, INFO)  # still uploading
    store.move_dataset(ok.id, "validating", allowed_from={"uploading"})
    assert store.set_dataset_ready(ok.id, INFO)
    ready = store.get_dataset(ok.id)
    assert ready is not None and ready.status == "ready" and ready.info == INFO and ready.error is None
    assert not store.set_dataset_invalid(ok.id, "too late")  # ready is final
    assert store.set_dataset_invalid(bad.id, "sha256 mismatch")
    invalid = store.get_dataset(bad.id)
    assert invalid is not None and invalid.status == "invalid" and invalid.error == "sha256 mismatch"
    assert invalid.info is None


def test_list_newest_first_with_cursor_and_status(store: JobStore) -> None:
    made = [make(store, name=f"d{i}") for i in range(7)]
    make(store, owner="key_b")
    store.move_dataset(made[2].id, "validating", allowed_from={"uploading"})
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = store.list_datasets("key_a", cursor=cursor, limit=3)
        seen += [d.id for d in page]
        if cursor is None:
            break
    # Newest first; datasets made in the same millisecond come by id, descending.
    assert seen == [d.id for d in sorted(made, key=lambda d: (d.created_at, d.id), reverse=True)]
    validating, nxt = store.list_datasets("key_a", status="validating")
    assert [d.id for d in validating] == [made[2].id] and nxt is None
    assert [d.owner for d in store.list_datasets("key_b")[0]] == ["key_b"]
    assert store.list_datasets("nobody") == ([], None)
    with pytest.raises(InvalidCursor):
        store.list_datasets("key_a", cursor="garbage")
    with pytest.raises(ValueError, match="unknown"):
        store.list_datasets("key_a", status="done")


def test_delete_refused_while_an_active_job_names_it(store: JobStore) -> None:
    record = make(store)
    other = make(store)
    spec = {"dataset": {"name": "npz", "id": record.id}}
    job = store.create_job("key_a", spec, queue="cpu")
    store.create_job("key_a", {"dataset": {"name": "npz", "id": other.id}}, queue="cpu")
    store.create_job("key_a", {"dataset": {"name": "digits"}}, queue="cpu")
    store.create_job("key_b", spec, queue="cpu")  # another owner's job cannot use key_a's dataset
    assert store.active_jobs_using("key_a", record.id) == [job.id]
    with pytest.raises(DatasetInUse) as refused:
        store.delete_dataset(record.id)
    assert refused.value.job_ids == [job.id]
    assert store.get_dataset(record.id) is not None
    store.transition(job.id, "running", allowed_from={"queued"})
    with pytest.raises(DatasetInUse):
        store.delete_dataset(record.id)
    store.transition(job.id, "succeeded", allowed_from={"running"})
    assert store.active_jobs_using("key_a", record.id) == []
    assert store.delete_dataset(record.id)
    assert store.get_dataset(record.id) is None
    assert [d.id for d in store.list_datasets("key_a")[0]] == [other.id]
    assert not store.delete_dataset(record.id)


def test_delete_leaves_no_key_behind(store: JobStore) -> None:
    before = set(store.redis.scan_iter(match=f"{store.prefix}:*"))
    record = make(store, owner="key_c")
    assert store.delete_dataset(record.id)
    assert set(store.redis.scan_iter(match=f"{store.prefix}:*")) == before
