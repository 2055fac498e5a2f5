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
the device as it is used, instead of moving the whole set there.

The options (:class:`DataOptions`) are passed to :func:`app_engine.data.load_dataset` (and
:func:`app_engine.runner.run`) by the caller: the engine reads no environment. The command line and
the worker build them with :meth:`DataOptions.from_env` from ``APP_DATA_MEMORY_CAP_BYTES`` (default
4 GiB) and the cache folder (the worker's ``APP_CACHE_DIR``; by default ``~/.cache/anytime-prune``).
Without a cache folder a set over the cap is loaded into memory as before, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

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
    """The uint8 array of ``shape`` cached for ``source`` under ``key``, memory-mapped. On a miss,
    ``fill`` writes the array into a fresh map, which is then renamed into place; whatever ``fill``
    raises leaves no file behind."""
    assert options.cache_dir is not None, "decoded_array needs a cache folder"
    folder = options.cache_dir / DECODED
    prefix = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    final = folder / f"{prefix}-{key}.npy"
    if final.exists():
        arr = _map(final)
        if arr.shape == shape and arr.dtype == np.uint8:
            log.info("%s: decoded images reused from %s", source, final)
            return arr
        log.warning("%s: %s holds %s %s, not uint8 %s; decoding again", source, final, arr.dtype, arr.shape, shape)
        del arr
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataOptionError(f"{folder}: cannot create the decoded-data cache folder ({exc})") from None
    _remove_stale(folder)
    tmp = folder / f".{final.name}.{uuid.uuid4().hex}.tmp"
    log.info("%s: decoding %s images into %s", source, shape[0], final)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        fill(out)
        out.flush()
        del out
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for old in folder.glob(f"{prefix}-*.npy"):
        if old != final:
            # An older content of the same folder; a reader that still maps it keeps its pages.
            old.unlink(missing_ok=True)
    return _map(final)


def _remove_stale(folder: Path) -> None:
    """Delete temporary files a loader killed mid-decode left behind (a decode in progress
    rewrites its file far more often than once a day)."""
    cutoff = time.time() - STALE_TMP_S
    for leftover in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()


def _map(path: Path) -> np.ndarray:
    # Copy on write: the array is writable (torch.from_numpy warns about read-only ones), the
    # file is never written.
    arr: np.ndarray = np.load(path, mmap_mode="c")
    return arr
