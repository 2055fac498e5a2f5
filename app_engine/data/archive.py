"""Unpacking an uploaded dataset file into what its loader reads, refusing hostile archives.

An upload is untrusted: :func:`unpack_dataset` reads a ``.zip`` or ``.tar`` (plain, gzip, bzip2 or
xz; told apart by magic bytes, never by file name) member by member and writes regular files and
folders only. It refuses, with a :class:`~app_engine.data.base.DatasetError` naming the problem:

- members that would land outside the folder (``..``, absolute paths, drive letters);
- symbolic and hard links, devices, FIFOs and other special members;
- more members than ``max_members``, or more unpacked bytes than ``max_bytes``, counted on the
  bytes actually decompressed (a header's size is never trusted), so a bomb stops at the limit;
- truncated or corrupt archives, and content that does not match the declared format.

Nothing is left at ``dest`` unless everything succeeded: members are written to a temporary folder
beside it, which is renamed to ``dest`` at the end (one atomic rename on one file system). File
modes, owners and times in the archive are ignored; files are written with the process's defaults.

An ``.npz`` is a zip too, but it is not unpacked: its members are checked
(:func:`~app_engine.data.npz.check_npz_members`) and the file is copied as it is.
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

from app_engine.data.base import DatasetError
from app_engine.data.cifar import is_cifar_folder
from app_engine.data.npz import check_npz_members

_CHUNK = 1024 * 1024
NPZ_NAME = "dataset.npz"

# What each archive format must hold, as a user reads it in an error message.
_EXPECTED = {
    "cifar10": "the folder cifar-10-batches-py/ or its files data_batch_1..5, test_batch and batches.meta",
    "cifar100": "the folder cifar-100-python/ or its files train, test and meta",
    "imagefolder": "a train/ folder with one folder of images per class (and optionally test/)",
}
ARCHIVE_FORMATS: tuple[str, ...] = tuple(_EXPECTED)

# Errors a damaged compressed stream raises while it is read (gzip's BadGzipFile is an OSError).
_READ_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError,
    NotImplementedError,  # a zip compression method zipfile does not know
)


def archive_kind(path: Path) -> str | None:
    """``"zip"`` or ``"tar"`` from the file's first bytes; None for anything else."""
    with path.open("rb") as fh:
        head = fh.read(262)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a local file header; an empty zip
        return "zip"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")) or head[257:262] == b"ustar":
        return "tar"  # gzip, bzip2, xz (compressed tars), or a plain POSIX tar
    return None


def unpack_dataset(fmt: str, source: Path, dest: Path, *, max_bytes: int, max_members: int) -> Path:
    """Unpack the upload ``source`` of format ``fmt`` into the new folder ``dest``; returns the
    path to give the loader as ``dataset.path`` (the .npz file, the folder holding the CIFAR files
    or the image folder's root, all inside ``dest``). ``dest`` must not exist."""
    source, dest = Path(source), Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.unpack-"))
    try:
        inner = _unpack_into(fmt, source, tmp, max_bytes=max_bytes, max_members=max_members)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest / inner


def _unpack_into(fmt: str, source: Path, root: Path, *, max_bytes: int, max_members: int) -> Path:
    kind = archive_kind(source)
    if fmt == "npz":
        if kind != "zip":
            raise DatasetError("not an .npz file (an .npz is a zip archive of .npy arrays)")
        with _open_zip(source) as archive:
            check_npz_members(archive, Path(source.name), max_bytes=max_bytes, max_members=max_members)
        shutil.copyfile(source, root / NPZ_NAME)
        return Path(NPZ_NAME)
    if fmt not in _EXPECTED:
        raise DatasetError(f"unknown dataset format '{fmt}'; known: npz, {', '.join(ARCHIVE_FORMATS)}")
    budget = _Budget(max_bytes=max_bytes, max_members=max_members)
    if kind == "zip":
        _extract_zip(source, root, budget)
    elif kind == "tar":
        _extract_tar(source, root, budget)
    else:
        raise DatasetError(f"a {fmt} dataset is uploaded as a .zip or .tar.gz archive; this file is neither")
    return _layout_root(fmt, root).relative_to(root)


class _Budget:
    """Members and bytes written so far, against the limits."""

    def __init__(self, *, max_bytes: int, max_members: int) -> None:
        self.max_bytes, self.max_members = max_bytes, max_members
        self.bytes = self.members = 0

    def add_member(self) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise DatasetError(f"the archive holds more than {self.max_members} members")

    def add_bytes(self, count: int) -> None:
        self.bytes += count
        if self.bytes > self.max_bytes:
            raise DatasetError(f"the archive unpacks to more than {self.max_bytes} bytes")


@contextmanager
def _reading(what: str) -> Iterator[None]:
    """Turn a damaged-archive error raised while reading into a DatasetError naming ``what``."""
    try:
        yield
    except DatasetError:
        raise
    except _READ_ERRORS as exc:
        raise DatasetError(f"truncated or corrupt archive: {what} ({type(exc).__name__}: {exc})") from None


def _member_path(name: str) -> PurePosixPath | None:
    """The relative path a member may be written to; None for the archive's root itself ("./").

    Backslashes count as separators (zips made on Windows use them), so ``..\\x`` is caught too.
    """
    cleaned = name.replace("\\", "/")
    parts = PurePosixPath(cleaned).parts
    if cleaned.startswith("/") or (len(cleaned) > 1 and cleaned[1] == ":") or ".." in parts or "\x00" in name:
        raise DatasetError(f"archive member {name!r} escapes the archive's folder (an absolute path or '..')")
    kept = [part for part in parts if part not in ("", ".")]
    return PurePosixPath(*kept) if kept else None


def _target(root: Path, rel: PurePosixPath) -> Path:
    target = root / rel
    # Links are never written, so nothing inside root can point out of it; checked anyway.
    if not target.resolve().is_relative_to(root.resolve()):
        raise DatasetError(f"archive member '{rel}' escapes the archive's folder")
    return target


def _make_dir(root: Path, rel: PurePosixPath | None) -> None:
    if rel is None:
        return
    try:
        _target(root, rel).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DatasetError(f"archive member '{rel}/' conflicts with a file of the same name") from None


def _write_member(root: Path, rel: PurePosixPath | None, name: str, read: Callable[[int], bytes],
                  budget: _Budget) -> None:
    """Copy one member's content from ``read`` to its file, counting every byte read."""
    if rel is None:
        raise DatasetError(f"archive member {name!r} is a file without a name")
    target = _target(root, rel)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        out = target.open("xb")  # a second member of the same name is refused, never merged
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise DatasetError(f"archive member '{rel}' conflicts with another member of the same name") from None
    with out:
        while True:
            with _reading(f"member '{rel}'"):
                chunk = read(_CHUNK)
            if not chunk:
                return
            budget.add_bytes(len(chunk))
            out.write(chunk)


@contextmanager
def _open_zip(source: Path) -> Iterator[zipfile.ZipFile]:
    with _reading("not a readable zip file"):
        archive = zipfile.ZipFile(source)
    with archive:
        yield archive


def _extract_zip(source: Path, root: Path, budget: _Budget) -> None:
    with _open_zip(source) as archive:
        for info in archive.infolist():
            budget.add_member()
            rel = _member_path(info.filename)
            # Zips made on Unix keep st_mode in the high 16 bits of external_attr; 0 elsewhere.
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind == stat.S_IFLNK:
                raise DatasetError(f"archive member {info.filename!r} is a symbolic link; links are refused")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise DatasetError(f"archive member {info.filename!r} is not a regular file or folder")
            if info.flag_bits & 0x1:
                raise DatasetError(f"archive member {info.filename!r} is encrypted")
            if info.is_dir() or kind == stat.S_IFDIR:
                _make_dir(root, rel)
                continue
            with _reading(f"member {info.filename!r}"):
                member: IO[bytes] = archive.open(info)
            with member:
                _write_member(root, rel, info.filename, member.read, budget)


def _extract_tar(source: Path, root: Path, budget: _Budget) -> None:
    with source.open("rb") as fh:
        # Stream mode ("r|*"): members are read once, in order, and a compressed stream is never
        # decompressed twice (random access would re-read it from the start to seek).
        with _reading("not a readable tar archive"):
            archive = tarfile.open(fileobj=fh, mode="r|*")
        with archive:
            while True:
                with _reading("a member header"):
                    member = archive.next()
                if member is None:
                    return
                budget.add_member()
                rel = _member_path(member.name)
                if member.issym() or member.islnk():
                    kind = "symbolic" if member.issym() else "hard"
                    raise DatasetError(f"archive member {member.name!r} is a {kind} link; links are refused")
                if member.isdir():
                    _make_dir(root, rel)
                    continue
                if not member.isreg() or member.issparse():
                    what = "a device or FIFO" if member.isdev() else "not a regular file or folder"
                    raise DatasetError(f"archive member {member.name!r} is {what}")
                with _reading(f"member {member.name!r}"):
                    content = archive.extractfile(member)
                if content is None:  # pragma: no cover  # isreg() members always have content
                    raise DatasetError(f"archive member {member.name!r} has no content")
                with content:
                    _write_member(root, rel, member.name, content.read, budget)


def _layout_root(fmt: str, root: Path) -> Path:
    """The folder the loader of ``fmt`` reads: ``root``, or the single folder wrapping it (an
    archive of ``mydata/cifar-10-batches-py/...``), as deep as single folders go."""
    current = root
    while True:
        if is_cifar_folder(current, fmt) if fmt in ("cifar10", "cifar100") else (current / "train").is_dir():
            return current
        # macOS adds __MACOSX/ and ._name files to its zips: not part of anyone's data.
        children = [c for c in current.iterdir() if not c.name.startswith(".") and c.name != "__MACOSX"]
        if len(children) != 1 or not children[0].is_dir():
            raise DatasetError(f"the archive holds no {fmt} dataset: expected {_EXPECTED[fmt]}")
        current = children[0]
