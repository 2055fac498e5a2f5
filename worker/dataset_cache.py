"""A worker's local copies of uploaded datasets, unpacked, keyed by content, least recently used
evicted: how a training job on ``dataset.id`` gets its data on any host.

Layout under ``cache_dir`` (one folder per entry; several workers on one host share it)::

    {sha256}-{format}/entry.json   what the loader reads (a path inside the entry), and its size
    {sha256}-{format}/data/...     the unpacked upload (app_engine.data.archive.unpack_dataset)
    {sha256}-{format}/.lock        shared-locked (flock) while a job reads the entry
    {sha256}-{format}/last-used    touched on every use: the LRU order
    .tmp/                          downloads and entries being built or evicted
    decoded/{source}-{content}.npy image folders over the memory cap, decoded (app_engine.data.disk_cache)

An entry is built in ``.tmp`` (download, sha256 check, unpack) and renamed into place, so a reader
never sees half an entry; when two workers fetch the same dataset at once, the second rename fails
and that worker uses the first one's entry. Eviction takes an entry's lock exclusively without
waiting (an entry in use is never evicted), renames it into ``.tmp`` and deletes it there. The
format is part of the key because one file read as two formats unpacks into two different things.

The size limit (``APP_CACHE_MAX_BYTES``) covers the entries and the decoded files together, one
least-recently-used order over both: a decoded file is in use while a job maps it (the engine holds
a shared lock on it for as long as the array lives) and is never removed then. Eviction runs when an
entry is opened and again once a job's data is loaded (a decode may just have added a file).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from app_common.datasets import READY, DatasetRecord
from app_common.settings import Settings
from app_common.spec import JobSpec
from app_common.storage import Storage, dataset_key
from app_common.store import JobStore
from app_engine.errors import RunInputError
from worker.datasets import sha256_file

if TYPE_CHECKING:
    from app_engine.data import DataOptions, Dataset

log = logging.getLogger(__name__)

# A folder in .tmp untouched this long belongs to a worker that died.
STALE_TMP_S = 24 * 3600
_ENTRY, _DATA, _LOCK, _LAST_USED, _TMP = "entry.json", "data", ".lock", "last-used", ".tmp"


class DatasetUnavailable(RunInputError):
    """A job names a dataset it cannot use (deleted, not ready, its file changed): running the job
    again gives the same answer, so it fails at once with this message as the reason."""


class DatasetCache:
    """Unpacked datasets and decoded image folders under ``root``, at most ``max_bytes`` of them
    beyond those in use. ``storage`` (where uploads are fetched from) may be None for a cache that
    only evicts."""

    def __init__(self, root: Path, storage: Storage | None, *, max_bytes: int, max_extracted_bytes: int,
                 max_members: int) -> None:
        self.root = Path(root)
        self.storage = storage
        self.max_bytes = max_bytes
        self.max_extracted_bytes = max_extracted_bytes
        self.max_members = max_members
        self._tmp = self.root / _TMP
        self._tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._clean_stale()

    def _clean_stale(self) -> None:
        """Remove what a worker killed mid-fetch or mid-eviction left in ``.tmp`` (a fetch in
        progress is far younger: no download or unpack takes a day)."""
        cutoff = time.time() - STALE_TMP_S
        for leftover in self._tmp.iterdir():
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < cutoff:
                    shutil.rmtree(leftover, ignore_errors=True)

    @classmethod
    def from_settings(cls, settings: Settings, storage: Storage | None) -> DatasetCache:
        return cls(Path(settings.cache_dir), storage, max_bytes=settings.cache_max_bytes,
                   max_extracted_bytes=settings.max_dataset_extracted_bytes, max_members=settings.max_dataset_members)

    def entry_dir(self, record: DatasetRecord) -> Path:
        return self.root / f"{record.sha256}-{record.format}"

    @contextlib.contextmanager
    def open(self, record: DatasetRecord) -> Iterator[Path]:
        """The path to give ``record``'s loader as ``dataset.path``, fetched on first use; the
        entry cannot be evicted (by any worker on this host) until the block ends."""
        entry = self.entry_dir(record)
        fd = self._lock_shared(entry)
        while fd is None:
            self._fetch(record, entry)
            fd = self._lock_shared(entry)
        try:
            (entry / _LAST_USED).touch()
            meta = json.loads((entry / _ENTRY).read_text())
            self.evict(keep=entry)
            yield entry / meta["path"]
        finally:
            os.close(fd)

    def _lock_shared(self, entry: Path) -> int | None:
        """A shared lock on a complete ``entry``; None when there is none (or it was just evicted)."""
        try:
            fd = os.open(entry / _LOCK, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while an evictor holds it (a rename, briefly)
            # Still in place? An evictor may have renamed it away before we got the lock.
            if os.fstat(fd).st_ino == (entry / _LOCK).stat().st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
        return None

    def _fetch(self, record: DatasetRecord, entry: Path) -> None:
        """Build ``entry`` from the store: download, check the sha256, unpack, rename into place."""
        from app_engine.data.archive import unpack_dataset

        if self.storage is None:
            raise RuntimeError("this dataset cache has no storage to fetch uploads from")
        build = Path(tempfile.mkdtemp(dir=self._tmp, prefix="fetch-"))
        try:
            content = build / "upload"
            self.storage.get_file(dataset_key(record.id), content)
            digest = sha256_file(content)
            if digest != record.sha256:
                raise DatasetUnavailable(
                    f"dataset {record.id}: the stored file's sha256 is {digest}, not the {record.sha256} validated"
                )
            path = unpack_dataset(record.format, content, build / _DATA, max_bytes=self.max_extracted_bytes,
                                  max_members=self.max_members)
            content.unlink()
            size = sum(p.stat().st_size for p in (build / _DATA).rglob("*") if p.is_file())
            (build / _ENTRY).write_text(json.dumps(
                {"id": record.id, "format": record.format, "path": path.relative_to(build).as_posix(), "bytes": size}
            ))
            (build / _LOCK).touch()
            (build / _LAST_USED).touch()
            try:
                os.rename(build, entry)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                log.info("dataset %s: another worker cached it first", record.id)
                shutil.rmtree(build, ignore_errors=True)
            else:
                log.info("dataset %s: cached in %s (%d bytes)", record.id, entry, size)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, path) of every complete entry (a folder) and decoded file, least
        recently used first: what counts against ``max_bytes``."""
        from app_engine.data.disk_cache import decoded_files

        found = decoded_files(self.root)
        for folder in self.root.iterdir():
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            with contextlib.suppress(OSError, ValueError, KeyError):
                size = int(json.loads((folder / _ENTRY).read_text())["bytes"])
                found.append(((folder / _LAST_USED).stat().st_mtime, size, folder))
        return sorted(found, key=lambda e: (e[0], e[2].name))

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used entries and decoded files until the cache holds at most
        ``max_bytes``, never ``keep`` nor one some worker is using; returns what was removed."""
        from app_engine.data.disk_cache import remove_if_unused

        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            # An entry is a folder, a decoded image folder one file: each kind has its own lock.
            gone = self._remove(path) if path.is_dir() else remove_if_unused(path)
            if gone:
                total -= size
                removed.append(path)
        if total > self.max_bytes:
            log.info("dataset cache: %d bytes in use or kept, over the limit of %d", total, self.max_bytes)
        return removed

    def _remove(self, folder: Path) -> bool:
        try:
            fd = os.open(folder / _LOCK, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # in use
            if os.fstat(fd).st_ino != (folder / _LOCK).stat().st_ino:
                return False  # replaced meanwhile
            trash = self._tmp / f"evict-{uuid.uuid4().hex}"
            os.rename(folder, trash)
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("dataset cache: evicted %s", folder.name)
        return True


def load_job_data(spec: JobSpec, *, store: JobStore, storage: Storage, settings: Settings) -> Dataset | None:
    """The data of a job on an uploaded dataset (``dataset.id``), loaded through this host's
    cache, or on files under the data folder (``dataset.path``, :func:`load_path_data`); None for
    built-in data (the engine loads it itself). Raises :class:`DatasetUnavailable` when the
    dataset is gone or not ready."""
    dataset_id = spec.dataset.id
    if dataset_id is None:
        return load_path_data(spec, settings) if spec.dataset.path is not None else None
    from app_engine.data import load_dataset

    record = store.get_dataset(dataset_id)
    if record is None:
        raise DatasetUnavailable(f"dataset.id {dataset_id}: no such dataset (it was deleted)")
    if record.status != READY:
        raise DatasetUnavailable(f"dataset.id {dataset_id}: the dataset is {record.status}, not ready")
    if spec.dataset.name != record.format:
        raise DatasetUnavailable(f"dataset.name '{spec.dataset.name}' is not the upload's format '{record.format}'")
    cache = DatasetCache.from_settings(settings, storage)
    with cache.open(record) as path:
        # The spec itself stays as submitted (its fingerprint is the same on every host).
        local = spec.dataset.model_copy(update={"path": str(path), "id": None})
        data = load_dataset(local, seed=spec.training.seed, options=data_options(settings))
        cache.evict(keep=cache.entry_dir(record))  # a decode may have added a file; this one is locked
        return data


def load_path_data(spec: JobSpec, settings: Settings) -> Dataset:
    """The data of a job on files under the data folder (``dataset.path``, checked beforehand by
    the job), loaded here rather than by the engine so that a set too large for memory is decoded
    into this host's cache (:func:`data_options`)."""
    from app_engine.data import load_dataset
    from app_engine.runner import resolve_dataset_path

    local = resolve_dataset_path(spec, Path(settings.data_dir)).dataset
    data = load_dataset(local, seed=spec.training.seed, options=data_options(settings))
    # A decode may have added a file to the cache (locked while ``data`` lives): keep to the limit.
    DatasetCache.from_settings(settings, None).evict()
    return data


def data_options(settings: Settings) -> DataOptions:
    """The engine's options for sets too large for memory: decoded once into a memory-mapped file
    under this host's cache folder (``decoded/``, beside the entries and evicted with them), past
    the cap in ``APP_DATA_MEMORY_CAP_BYTES`` (default 4 GiB)."""
    from app_engine.data import DataOptions

    return DataOptions.from_env(os.environ, cache_dir=Path(settings.cache_dir))
