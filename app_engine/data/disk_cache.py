"""Data larger than memory: decoded images kept in a memory-mapped file in a local cache folder.

A loader whose decoded set (uint8 ``[N, C, H, W]``) is larger than the memory cap decodes it once
into ``{cache_dir}/decoded/{source}-{content}.npy`` and from then on maps that file instead of
decoding again. ``source`` is a hash of the folder's path, ``content`` a hash of what the decoded
array depends on (every file's relative path, size and modification time, the image size, the
decoder version): a changed folder gets a new file, and the file of its previous content is
removed once the new one is in place. The file is written under a temporary name and renamed, so
a reader (another worker on the host, a later run) never maps half a file; two loaders decoding
at once both finish and the last rename wins.

The splits of such a dataset are CPU tensors over the map (``torch.from_numpy``, no copy), and the
dataset is marked ``streamed``: the runner then leaves them in host memory and moves each batch to
the device as it is used, instead of moving the whole set there (on CUDA, gathered ahead into
pinned memory by :func:`app_engine.data.prefetch.device_batches`).

The options (:class:`DataOptions`) are passed to :func:`app_engine.data.load_dataset` (and
:func:`app_engine.runner.run`) by the caller: the engine reads no environment. The command line and
the worker build them with :meth:`DataOptions.from_env` from ``APP_DATA_MEMORY_CAP_BYTES`` (default
4 GiB) and the cache folder (the worker's ``APP_CACHE_DIR``; by default ``~/.cache/anytime-prune``).
Without a cache folder a set over the cap is loaded into memory as before, with a warning.

The decoded files count against the cache's size limit like the unpacked uploads beside them (the
worker's ``APP_CACHE_MAX_BYTES``, :mod:`worker.dataset_cache`), evicted least recently used first.
Two rules make that safe, and :func:`decoded_files` and :func:`remove_if_unused` are the only
places that read them: a loader holds a shared ``flock`` on the file it maps for as long as the
array lives (taken on the temporary file before it is renamed into place, so a fresh file is never
unguarded), and each use sets the file's modification time (the LRU order). An evictor takes the
lock exclusively without waiting, so a file some job still maps is never removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from app_engine.errors import RunInputError

log = logging.getLogger(__name__)

ENV_MEMORY_CAP = "APP_DATA_MEMORY_CAP_BYTES"
ENV_CACHE_DIR = "APP_CACHE_DIR"
DEFAULT_MEMORY_CAP = 4 * 2**30
DECODED = "decoded"
# Part of every content key: bump it when the decoder's output changes for the same files.
DECODER_VERSION = 1
# A temporary file untouched this long belongs to a loader that died.
STALE_TMP_S = 24 * 3600


class DataOptionError(RunInputError):
    """A data option (argument or environment variable) that is not usable; the message names it."""


@dataclass(frozen=True)
class DataOptions:
    """How loaders treat large sets: ``memory_cap_bytes`` is the largest decoded set kept in
    memory; larger ones go to a memory-mapped file under ``cache_dir / "decoded"`` (with no
    ``cache_dir``, into memory all the same)."""

    memory_cap_bytes: int = DEFAULT_MEMORY_CAP
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.memory_cap_bytes < 0:
            raise DataOptionError(f"memory cap ({ENV_MEMORY_CAP}): {self.memory_cap_bytes} bytes is negative")

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, cache_dir: Path | str | None = None) -> DataOptions:
        """The options an edge (command line, worker) reads from its environment ``env``: the cap
        from ``APP_DATA_MEMORY_CAP_BYTES``, the folder ``cache_dir`` if given, else ``APP_CACHE_DIR``,
        else ``~/.cache/anytime-prune``."""
        raw = env.get(ENV_MEMORY_CAP, "").strip()
        try:
            cap = int(raw) if raw else DEFAULT_MEMORY_CAP
        except ValueError:
            raise DataOptionError(f"{ENV_MEMORY_CAP}: '{raw}' is not a whole number of bytes") from None
        if cache_dir is None:
            folder = env.get(ENV_CACHE_DIR, "").strip()
            cache_dir = Path(folder) if folder else Path("~/.cache/anytime-prune")
        return cls(memory_cap_bytes=cap, cache_dir=Path(cache_dir).expanduser())


_OPTIONS: ContextVar[DataOptions | None] = ContextVar("data_options", default=None)


@contextlib.contextmanager
def using_options(options: DataOptions) -> Iterator[None]:
    """Make ``options`` the ones :func:`current_options` returns inside the block (the loader
    registry's signature, ``fn(spec, seed)``, has no place for them)."""
    token = _OPTIONS.set(options)
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def current_options() -> DataOptions:
    """The options of the :func:`~app_engine.data.load_dataset` call in progress, else the defaults."""
    return _OPTIONS.get() or DataOptions()


def content_key(root: Path, files: Sequence[Path], *extra: object) -> str:
    """A hash of what a decoded array of ``files`` (under ``root``) depends on: each file's path
    relative to ``root``, size and modification time, in order, and ``extra``."""
    digest = hashlib.sha256(f"v{DECODER_VERSION}|{'|'.join(map(str, extra))}".encode())
    for f in files:
        st = f.stat()
        digest.update(f"\0{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def decoded_array(
    options: DataOptions,
    source: Path,
    key: str,
    shape: tuple[int, ...],
    fill: Callable[[np.ndarray], None],
) -> np.ndarray:
    """The uint8 array of ``shape`` cached for ``source`` under ``key``, memory-mapped and locked
    against eviction while it lives. On a miss, ``fill`` writes the array into a fresh map, which is
    then renamed into place; whatever ``fill`` raises leaves no file behind."""
    assert options.cache_dir is not None, "decoded_array needs a cache folder"
    folder = options.cache_dir / DECODED
    prefix = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    final = folder / f"{prefix}-{key}.npy"
    held = _lock_shared(final)
    if held is not None:
        arr = _map_locked(held)
        if arr is not None and arr.shape == shape:
            with contextlib.suppress(OSError):
                os.utime(final)  # the LRU order: used now
            log.info("%s: decoded images reused from %s", source, final)
            return arr
        log.warning("%s: %s does not hold uint8 %s; decoding again", source, final, shape)
        del arr
        held.close()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataOptionError(f"{folder}: cannot create the decoded-data cache folder ({exc})") from None
    _remove_stale(folder)
    tmp = folder / f".{final.name}.{uuid.uuid4().hex}.tmp"
    log.info("%s: decoding %s images into %s", source, shape[0], final)
    held = None
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        fill(out)
        out.flush()
        del out
        # Locked before the rename: an evictor never sees the new file unguarded.
        held = tmp.open("rb")
        fcntl.flock(held.fileno(), fcntl.LOCK_SH)
        os.replace(tmp, final)
    except BaseException:
        if held is not None:
            held.close()
        tmp.unlink(missing_ok=True)
        raise
    for old in folder.glob(f"{prefix}-*.npy"):
        if old != final:
            # An older content of the same folder, never to be read again; a reader that still
            # maps it keeps its pages until it lets go.
            old.unlink(missing_ok=True)
    arr = _map_locked(held)
    if arr is None:  # pragma: no cover  # the file was written just above
        held.close()
        raise DataOptionError(f"{final}: the decoded file just written cannot be read back")
    return arr


def decoded_files(cache_dir: Path) -> list[tuple[float, int, Path]]:
    """(last use, bytes, file) of every complete decoded file under ``cache_dir``, in use or not
    (what counts against the cache's size limit)."""
    found = []
    folder = cache_dir / DECODED
    if not folder.is_dir():
        return []
    for path in folder.glob("*.npy"):
        with contextlib.suppress(OSError):  # removed meanwhile
            st = path.stat()
            found.append((st.st_mtime, st.st_size, path))
    return found


def remove_if_unused(path: Path) -> bool:
    """Delete the decoded file ``path`` unless a loader maps it (holds its shared lock); True if
    it was removed here."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # mapped by a job
        if os.fstat(fd).st_ino != path.stat().st_ino:
            return False  # replaced meanwhile by a fresh (locked) decode
        path.unlink()
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)
    log.info("decoded-data cache: removed %s", path.name)
    return True


def _lock_shared(path: Path) -> IO[bytes] | None:
    """``path`` opened and shared-locked, if it exists and is still the file at ``path`` once
    locked (an evictor may have removed it between the open and the lock)."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH)  # waits while an evictor holds it (an unlink, briefly)
        if os.fstat(fh.fileno()).st_ino == path.stat().st_ino:
            return fh
    except FileNotFoundError:
        pass
    fh.close()
    return None


def _map_locked(fh: IO[bytes]) -> np.ndarray | None:
    """The uint8 array of the locked .npy ``fh``, mapped through that very file (not its name, which
    may point elsewhere by now); the lock is released when the array (and every view of it) is
    gone. None if the file is not a C-ordered uint8 .npy."""
    try:
        fh.seek(0)
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except (ValueError, OSError):
        return None
    if fortran or dtype != np.uint8 or not shape:
        return None
    # Copy on write: the array is writable (torch.from_numpy warns about read-only ones), the
    # file is never written.
    arr = np.memmap(fh, dtype=np.uint8, mode="c", offset=fh.tell(), shape=shape)
    weakref.finalize(arr, fh.close)
    return arr


def _remove_stale(folder: Path) -> None:
    """Delete temporary files a loader killed mid-decode left behind (a decode in progress
    rewrites its file far more often than once a day)."""
    cutoff = time.time() - STALE_TMP_S
    for leftover in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
