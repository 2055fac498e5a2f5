"""Object storage: the one interface behind which datasets, megabatch checkpoints and exported
files live, so that the API and workers on different hosts share files without a shared disk.

Keys are ``/``-separated relative names (``jobs/<id>/artifacts/model.safetensors``). Every write
is all-or-nothing: after a failed or refused write (too large, cut off, backend error) no object,
not even a partial one, exists under the key. Backends: :mod:`app_common.storage.local` (a
folder; one host, the embedded default) and :mod:`app_common.storage.s3` (any S3-compatible
service). Torch-free.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# Letters, digits and ._- in segments separated by single slashes; no empty, "." or ".." segment.
_KEY = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*(/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)*$")
CHUNK_BYTES = 1024 * 1024


class StorageError(Exception):
    """The store could not do what was asked (unreachable, refused, misconfigured)."""


class ObjectNotFound(StorageError, KeyError):
    """No object under the key."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "object not found"


class ObjectTooLarge(StorageError):
    """A write was refused because it exceeded its size limit; nothing was stored."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    bytes: int


@dataclass(frozen=True)
class PresignedPost:
    """A browser-style upload straight to the store: POST ``url`` as multipart/form-data with
    ``fields`` first and the file last (field name ``file``). The policy limits the size."""

    url: str
    fields: dict[str, str]
    expires_at: datetime


def check_key(key: str) -> str:
    if not _KEY.match(key) or len(key) > 1024:
        raise ValueError(f"invalid storage key {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A key prefix ending in ``/`` (listing and deleting work on whole folders only)."""
    if not prefix.endswith("/"):
        raise ValueError(f"a storage prefix ends with '/': {prefix!r}")
    check_key(prefix[:-1])
    return prefix


def limited(chunks: Iterable[bytes], max_bytes: int | None) -> Iterator[bytes]:
    """``chunks`` unchanged, raising :class:`ObjectTooLarge` as soon as more than ``max_bytes``
    went by (before the chunk that crosses the limit is passed on)."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if max_bytes is not None and total > max_bytes:
            raise ObjectTooLarge(f"more than {max_bytes} bytes")
        if chunk:
            yield chunk


class Storage(ABC):
    """What the service needs from an object store. Implementations are thread-safe."""

    #: Short name for logs and the catalog ("local", "s3").
    kind: str

    @abstractmethod
    def put_file(self, key: str, path: Path) -> StoredObject:
        """Store the file at ``path`` under ``key`` (replacing any object there)."""

    @abstractmethod
    def put_stream(self, key: str, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> StoredObject:
        """Store the concatenated ``chunks`` under ``key``, never holding them all in memory.

        Raises :class:`ObjectTooLarge` past ``max_bytes``; any exception raised by ``chunks``
        itself (a client that went away, a checksum the caller computes on the way) propagates.
        In every failure case nothing is stored under ``key``.
        """

    @abstractmethod
    def get_file(self, key: str, dest: Path) -> StoredObject:
        """Copy the object to ``dest`` atomically (a partial download never appears at ``dest``);
        :class:`ObjectNotFound` if there is none."""

    @abstractmethod
    def iter_chunks(self, key: str, *, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The object's content in chunks; :class:`ObjectNotFound` (at the first ``next``) if
        there is none."""

    @abstractmethod
    def stat(self, key: str) -> StoredObject | None:
        """The object's size, or None if there is none."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing one is fine."""

    @abstractmethod
    def list(self, prefix: str) -> list[StoredObject]:
        """Objects whose key starts with ``prefix`` (which ends in ``/``), sorted by key."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix``; returns how many."""
        objects = self.list(prefix)
        for obj in objects:
            self.delete(obj.key)
        return len(objects)

    def presigned_get(self, key: str, *, expires_s: int, filename: str | None = None) -> str | None:
        """A time-limited download link the store itself checks, or None when the backend has no
        such links (the API then signs its own links and serves the file)."""
        return None

    def presigned_post(self, key: str, *, max_bytes: int, expires_s: int) -> PresignedPost | None:
        """A time-limited upload straight to the store, limited to ``max_bytes``, or None when
        the backend cannot take direct uploads (clients then stream through the API)."""
        return None

    def local_path(self, key: str) -> Path | None:
        """The object's file on this host when the backend is a local folder, else None."""
        return None
