"""Sending a file to the service without holding it in memory: its sha256 and size read in
chunks, a request body that streams it from disk (raw, or as the last part of a
``multipart/form-data`` form for an object store's presigned POST), and progress as bytes go out.

Torch-free and httpx-free (standard library only); :mod:`anytime_prune.client` sends the bodies.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 1 << 20

# Called with (bytes sent so far, bytes in all) as the body goes out.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FileDigest:
    sha256: str  # 64 lowercase hex
    bytes: int


def file_digest(path: str | os.PathLike[str], *, chunk_bytes: int = CHUNK_BYTES) -> FileDigest:
    """The file's sha256 and size, read in chunks (a 2 GiB file needs 1 MiB of memory)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
            size += len(chunk)
    return FileDigest(digest.hexdigest(), size)


def file_chunks(
    path: str | os.PathLike[str], *, progress: Progress | None = None, total: int | None = None,
    sent_before: int = 0, chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[bytes]:
    """The file's bytes in chunks, reporting ``progress(sent_before + read, total)`` after each."""
    size = os.path.getsize(path) if total is None else total
    sent = sent_before
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            sent += len(chunk)
            yield chunk
            if progress is not None:
                progress(sent, size)


@dataclass(frozen=True)
class MultipartBody:
    """A ``multipart/form-data`` body: the form fields, then the file as the last part (an S3
    POST policy ignores every field after the file). ``head`` and ``tail`` are small; the file
    itself is streamed between them by :meth:`chunks`."""

    path: Path
    file_bytes: int
    head: bytes
    tail: bytes
    content_type: str

    @property
    def length(self) -> int:
        """The body's Content-Length (object stores refuse a chunked POST)."""
        return len(self.head) + self.file_bytes + len(self.tail)

    def chunks(self, progress: Progress | None = None) -> Iterator[bytes]:
        yield self.head
        yield from file_chunks(self.path, progress=progress, total=self.file_bytes)
        yield self.tail


def _quoted(value: str) -> str:
    # The HTML form-data encoding of a name in a Content-Disposition header.
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def multipart_form(
    fields: Mapping[str, str], path: str | os.PathLike[str], *, file_field: str = "file",
    filename: str | None = None, file_type: str = "application/octet-stream", boundary: str | None = None,
) -> MultipartBody:
    """The form ``fields`` (in their order) and the file at ``path`` as the last part."""
    file_path = Path(path)
    boundary = boundary or f"anytime-prune-{uuid.uuid4().hex}"
    dash = f"--{boundary}".encode()
    head = bytearray()
    for name, value in fields.items():
        head += dash + b"\r\n"
        head += f'Content-Disposition: form-data; name="{_quoted(name)}"\r\n\r\n'.encode()
        head += str(value).encode() + b"\r\n"
    head += dash + b"\r\n"
    head += (f'Content-Disposition: form-data; name="{_quoted(file_field)}"; '
             f'filename="{_quoted(filename or file_path.name)}"\r\n').encode()
    head += f"Content-Type: {file_type}\r\n\r\n".encode()
    tail = b"\r\n" + dash + b"--\r\n"
    return MultipartBody(file_path, file_path.stat().st_size, bytes(head), tail,
                         f"multipart/form-data; boundary={boundary}")
