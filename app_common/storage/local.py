"""The local-folder backend: objects are files under one root folder (one host).

The embedded default (``anytime-prune serve`` and the README's commands need no object store).
Writes go to a temporary file in ``{root}/.tmp`` and are renamed into place, so a reader never
sees a partial object and a failed write leaves nothing behind. Files are private to the service's
user (0600, folders 0700).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from app_common.storage.base import (
    CHUNK_BYTES,
    ObjectNotFound,
    Storage,
    StoredObject,
    check_key,
    check_prefix,
    limited,
)

_TMP = ".tmp"


def _private_dirs(folder: Path) -> None:
    """``mkdir -p`` with every folder it creates 0700 (``Path.mkdir`` gives missing parents the
    default mode)."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another writer made it meanwhile
            path.mkdir(mode=0o700)


class LocalStorage(Storage):
    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self._tmp = self.root / _TMP
        _private_dirs(self._tmp)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _commit(self, key: str, write: Iterable[bytes] | Path) -> StoredObject:
        """Write to a private temporary file, then rename it to the key's path."""
        target = self._path(key)
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(write, Path):
                    with write.open("rb") as src:
                        shutil.copyfileobj(src, out, CHUNK_BYTES)
                else:
                    for chunk in write:
                        out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            _private_dirs(target.parent)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StoredObject(key, target.stat().st_size)

    def put_file(self, key: str, path: Path) -> StoredObject:
        return self._commit(key, Path(path))

    def put_stream(self, key: str, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> StoredObject:
        return self._commit(key, limited(chunks, max_bytes))

    def get_file(self, key: str, dest: Path) -> StoredObject:
        source = self._path(key)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    src = source.open("rb")
                except FileNotFoundError:
                    raise ObjectNotFound(f"no object {key!r}") from None
                with src:
                    shutil.copyfileobj(src, out, CHUNK_BYTES)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StoredObject(key, dest.stat().st_size)

    def iter_chunks(self, key: str, *, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        path = self._path(key)
        try:
            src = path.open("rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key!r}") from None
        with src:
            while chunk := src.read(chunk_bytes):
                yield chunk

    def stat(self, key: str) -> StoredObject | None:
        path = self._path(key)
        return StoredObject(key, path.stat().st_size) if path.is_file() else None

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Drop folders the delete left empty, up to the root.
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            with contextlib.suppress(OSError):  # not empty: stop there
                parent.rmdir()
                parent = parent.parent
                continue
            break

    def list(self, prefix: str) -> list[StoredObject]:
        folder = self.root / check_prefix(prefix)
        if not folder.is_dir():
            return []
        found = [
            StoredObject(path.relative_to(self.root).as_posix(), path.stat().st_size)
            for path in folder.rglob("*")
            if path.is_file()
        ]
        return sorted(found, key=lambda o: o.key)

    def delete_prefix(self, prefix: str) -> int:
        count = len(self.list(prefix))
        shutil.rmtree(self.root / check_prefix(prefix), ignore_errors=True)
        return count

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

