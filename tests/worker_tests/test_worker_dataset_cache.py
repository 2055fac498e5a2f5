"""worker/dataset_cache.py: fetched once per host, checked, shared safely, least recently used
evicted (never an entry in use), and a job's data loaded from it; local storage backend."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_support import digits_npz, uploaded
from PIL import Image
from worker_support import SPEC

from app_common.datasets import DatasetRecord
from app_common.settings import Settings
from app_common.spec import JobSpec
from app_common.storage import LocalStorage, dataset_key
from app_common.store import JobStore
from app_engine.data.disk_cache import DECODED, ENV_MEMORY_CAP
from worker.dataset_cache import DatasetCache, DatasetUnavailable, load_job_data, load_path_data
from worker.job import execute_job


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


def cache_at(tmp_path: Path, storage: LocalStorage, max_bytes: int = 2**30) -> DatasetCache:
    return DatasetCache(tmp_path / "cache", storage, max_bytes=max_bytes, max_extracted_bytes=2**30,
                        max_members=100)


def ready(store: JobStore, storage: LocalStorage, tmp_path: Path, n_train: int = 300) -> DatasetRecord:
    return uploaded(store, storage, digits_npz(tmp_path / f"d{n_train}.npz", n_train=n_train), status="ready")


def leftovers(cache: DatasetCache) -> list[Path]:
    return list((cache.root / ".tmp").iterdir())


def test_fetched_on_first_use_then_served_from_the_cache(store: JobStore, storage: LocalStorage,
                                                         tmp_path: Path) -> None:
    record = ready(store, storage, tmp_path)
    cache = cache_at(tmp_path, storage)
    with cache.open(record) as path:
        assert path == cache.entry_dir(record) / "data" / "dataset.npz" and path.is_file()
    storage.delete(dataset_key(record.id))  # a second use does not read the store
    with cache_at(tmp_path, storage).open(record) as again:
        assert again == path
    assert [e[2] for e in cache.entries()] == [cache.entry_dir(record)] and leftovers(cache) == []


def test_a_stored_file_that_changed_is_refused(store: JobStore, storage: LocalStorage, tmp_path: Path) -> None:
    record = ready(store, storage, tmp_path)
    storage.put_file(dataset_key(record.id), digits_npz(tmp_path / "other.npz", n_train=200))
    cache = cache_at(tmp_path, storage)
    with pytest.raises(DatasetUnavailable, match=f"dataset {record.id}: the stored file's sha256 is"):
        with cache.open(record):
            pass
    assert cache.entries() == [] and leftovers(cache) == []


def test_two_fetches_at_once_leave_one_entry(store: JobStore, storage: LocalStorage, tmp_path: Path) -> None:
    record = ready(store, storage, tmp_path)
    cache = cache_at(tmp_path, storage)
    entry = cache.entry_dir(record)
    cache._fetch(record, entry)
    cache._fetch(record, entry)  # the second rename finds the first worker's entry: it is used as is
    paths: list[Path] = []

    def use() -> None:
        with cache_at(tmp_path, storage).open(record) as path:
            paths.append(path)

    threads = [threading.Thread(target=use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert paths == [entry / "data" / "dataset.npz"] * 3
    assert [e[2] for e in cache.entries()] == [entry] and leftovers(cache) == []


def test_least_recently_used_evicted_never_one_in_use(store: JobStore, storage: LocalStorage,
                                                      tmp_path: Path) -> None:
    a, b, c = (ready(store, storage, tmp_path, n) for n in (100, 200, 300))
    cache = cache_at(tmp_path, storage)
    for record in (a, b, c):
        with cache.open(record):
            pass
    # Last used: b long ago, a after it, c now.
    for record, age in ((b, 300), (a, 200), (c, 0)):
        stamp = (cache.entry_dir(record) / "last-used").stat().st_mtime - age
        os.utime(cache.entry_dir(record) / "last-used", (stamp, stamp))
    sizes = {e[2]: e[1] for e in cache.entries()}
    assert [e[2] for e in cache.entries()] == [cache.entry_dir(r) for r in (b, a, c)]
    # Room for c and one more: b goes.
    cache.max_bytes = sizes[cache.entry_dir(c)] + sizes[cache.entry_dir(a)]
    assert cache.evict() == [cache.entry_dir(b)]
    # No room at all: a is being read by a job (of another worker), so only c goes.
    other = cache_at(tmp_path, storage)
    with other.open(a):
        cache.max_bytes = 0
        assert cache.evict() == [cache.entry_dir(c)]
        assert cache.entry_dir(a).is_dir()
    # Opening an entry evicts past the limit too, but never the one being opened.
    with cache.open(b) as path:
        assert path.is_file() and [e[2] for e in cache.entries()] == [cache.entry_dir(b)]
    assert leftovers(cache) == []


def test_load_job_data(store: JobStore, storage: LocalStorage, settings: Settings, tmp_path: Path) -> None:
    local = settings.model_copy(update={"cache_dir": tmp_path / "cache"})
    record = ready(store, storage, tmp_path)
    spec = JobSpec.from_dict({"dataset": {"name": "npz", "id": record.id}, "architecture": "mlp"})
    data = load_job_data(spec, store=store, storage=storage, settings=local)
    assert data is not None and tuple(data.x_train.shape) == (300, 1, 8, 8) and data.num_classes == 10
    assert load_job_data(JobSpec.from_dict({}), store=store, storage=storage, settings=local) is None

    wrong = JobSpec.from_dict({"dataset": {"name": "cifar10", "id": record.id}, "architecture": "mlp"})
    with pytest.raises(DatasetUnavailable, match="dataset.name 'cifar10' is not the upload's format 'npz'"):
        load_job_data(wrong, store=store, storage=storage, settings=local)
    validating = uploaded(store, storage, digits_npz(tmp_path / "v.npz"))
    pending = JobSpec.from_dict({"dataset": {"name": "npz", "id": validating.id}})
    with pytest.raises(DatasetUnavailable, match=f"dataset.id {validating.id}: the dataset is validating, not ready"):
        load_job_data(pending, store=store, storage=storage, settings=local)
    missing = JobSpec.from_dict({"dataset": {"name": "npz", "id": "e" * 32}})
    with pytest.raises(DatasetUnavailable, match="no such dataset"):
        load_job_data(missing, store=store, storage=storage, settings=local)


def test_a_job_on_an_uploaded_dataset(store: JobStore, storage: LocalStorage, settings: Settings,
                                      tmp_path: Path) -> None:
    local = settings.model_copy(update={"cache_dir": tmp_path / "cache"})
    record = ready(store, storage, tmp_path)
    job = store.create_job("key_a", {**SPEC, "dataset": {"name": "npz", "id": record.id}}, queue="cpu")
    assert execute_job(job.id, store=store, settings=local, storage=storage) == "succeeded"
    done = store.get_job(job.id)
    assert done is not None and done.spec["dataset"] == {"name": "npz", "id": record.id}  # as submitted
    assert (local.cache_dir / f"{record.sha256}-npz").is_dir()
    # A dataset deleted before the job ran fails it at once with the reason (no retry).
    assert store.delete_dataset(record.id)
    late = store.create_job("key_a", {**SPEC, "dataset": {"name": "npz", "id": record.id}}, queue="cpu")
    assert execute_job(late.id, store=store, settings=local, storage=storage) == "failed"
    failed = store.get_job(late.id)
    assert failed is not None and failed.error == f"dataset.id {record.id}: no such dataset (it was deleted)"


def image_folder(root: Path, shade: int, per_class: int = 4) -> Path:
    """Two classes of flat 8x8 PNGs (4 KiB or so decoded at 16x16)."""
    for c, name in enumerate(("dark", "light")):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), shade + 60 * c + i, np.uint8)).save(folder / f"{i}.png")
    return root


def age(path: Path, seconds: float) -> None:
    """Make ``path`` (an entry's last-used file, or a decoded file) last used ``seconds`` ago."""
    stamp = path.stat().st_mtime - seconds
    os.utime(path, (stamp, stamp))


def test_decoded_image_folders_count_against_the_limit_and_go_once_unmapped(
    store: JobStore, storage: LocalStorage, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Image folders over the memory cap are decoded into the cache folder; those files share the
    entries' limit and LRU order, and one a job still maps is never removed."""
    local = settings.model_copy(update={"cache_dir": tmp_path / "cache", "cache_max_bytes": 0})
    monkeypatch.setenv(ENV_MEMORY_CAP, "0")  # every image folder is decoded to disk
    for name, shade in (("first", 10), ("second", 20)):
        image_folder(tmp_path / "data" / name, shade)

    def job(name: str) -> JobSpec:
        return JobSpec.from_dict({"dataset": {"name": "imagefolder", "path": name, "image_size": 16}})

    # A limit of 0: whatever is not in use goes, but the set just decoded is mapped by its job.
    first = load_path_data(job("first"), local)
    (first_file,) = (local.cache_dir / DECODED).glob("*.npy")
    assert first.streamed and first_file.stat().st_size > 8 * 3 * 16 * 16
    cache = DatasetCache.from_settings(local, storage)
    assert cache.entries() == [(first_file.stat().st_mtime, first_file.stat().st_size, first_file)]
    assert cache.evict() == [] and first_file.exists()
    del first
    second = load_path_data(job("second"), local)  # its eviction removes the first, unmapped now
    (second_file,) = (local.cache_dir / DECODED).glob("*.npy")
    assert second_file != first_file and not first_file.exists()

    # One LRU order over entries and decoded files: the least recently used of either kind goes.
    record = ready(store, storage, tmp_path)
    cache.max_bytes = 2**30
    with cache.open(record):
        pass
    entry = cache.entry_dir(record)
    del second
    sizes = {path: size for _, size, path in cache.entries()}
    assert set(sizes) == {entry, second_file}
    age(second_file, 300)
    cache.max_bytes = sizes[entry]
    assert cache.evict() == [second_file] and entry.is_dir()
    again = load_path_data(job("second"), local.model_copy(update={"cache_max_bytes": 2**30}))  # decoded again
    (second_file,) = (local.cache_dir / DECODED).glob("*.npy")
    age(entry / "last-used", 300)
    cache.max_bytes = sizes[second_file]
    assert cache.evict() == [entry] and second_file.exists()
    cache.max_bytes = 0
    assert cache.evict() == [] and second_file.exists()  # mapped by ``again``
    monkeypatch.delenv(ENV_MEMORY_CAP)
    in_memory = load_path_data(job("second"), local)
    assert not in_memory.streamed and torch.equal(again.x_train, in_memory.x_train)
    del again
    assert cache.evict() == [second_file] and cache.entries() == [] and leftovers(cache) == []
