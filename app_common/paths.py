"""The dataset path policy: where a job spec's ``dataset.path`` may point.

One rule for the API (which refuses a bad path with a 422 at submission) and the worker (which
fails the job before the engine reads anything): the path is written relative to the server's
data folder, names an existing regular file or folder there, and does not leave that folder once
symlinks are resolved. Symlinks an operator placed inside the folder (to a mounted dataset volume,
say) may point anywhere inside it; clients cannot create any.
"""

from __future__ import annotations

import stat
from pathlib import Path, PurePosixPath, PureWindowsPath


class DataPathError(ValueError):
    """A ``dataset.path`` the server refuses; the message says why (completes "dataset.path ...")."""


def resolve_data_path(data_dir: Path, path: str) -> Path:
    """The file or folder ``path`` names inside ``data_dir``, symlinks resolved.

    Raises :class:`DataPathError` for NUL characters, absolute or home-relative paths, ``..``,
    a path that leads outside ``data_dir`` after resolving symlinks, one that does not exist, and
    anything other than a regular file or a folder (FIFOs, devices and sockets would block or
    feed the engine endless data).
    """
    if "\x00" in path:
        raise DataPathError("must not contain NUL characters")
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).drive or path.startswith(("~", "\\")):
        raise DataPathError("must be relative to the server's data folder")
    if ".." in PurePosixPath(path.replace("\\", "/")).parts:
        raise DataPathError("must not contain '..'")
    try:
        root = Path(data_dir).resolve()
        full = (root / path).resolve()
        if not full.is_relative_to(root):
            raise DataPathError("leads outside the server's data folder")
        if not full.exists():
            raise DataPathError(f"{path!r} does not exist in the server's data folder")
        mode = full.stat().st_mode
    except (OSError, RuntimeError) as exc:  # symlink loops, names the OS refuses
        raise DataPathError("is not a valid path") from exc
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise DataPathError(f"{path!r} is not a regular file or folder")
    return full
