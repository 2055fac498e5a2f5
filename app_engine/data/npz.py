"""npz archives of ``x_train``, ``y_train``, ``x_test``, ``y_test``, read with ``allow_pickle=False``.

An .npz is a zip of .npy members, so it is checked like any archive before numpy reads an array
(:func:`check_npz_members`): numpy allocates each array from the shape its header declares, then
decompresses the member into it.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app_common.spec import DatasetSpec
from app_engine.data.base import Dataset, DatasetError, labels_tensor, register_dataset, require_path

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def check_npz_members(
    archive: zipfile.ZipFile, path: Path, *, max_bytes: int | None = None, max_members: int | None = None
) -> None:
    """Refuse an .npz that would make numpy allocate or decompress more than it holds.

    zipfile never yields more than a member's size in the zip directory (a member holding more
    fails its CRC check), so the directory sizes bound what numpy can read: their sum is checked
    against ``max_bytes`` and the member count against ``max_members``. Each .npy header must then
    declare exactly the bytes its member holds (a header declaring 10 GB in a 1 KB member would
    make numpy allocate 10 GB before noticing), and no member may be an object array (a pickle).
    """
    members = archive.infolist()
    if max_members is not None and len(members) > max_members:
        raise DatasetError(f"{path}: {len(members)} members in the npz, more than the {max_members} allowed")
    total = sum(info.file_size for info in members)
    if max_bytes is not None and total > max_bytes:
        raise DatasetError(f"{path}: the npz unpacks to {total} bytes, more than the {max_bytes} allowed")
    for info in members:
        if info.filename.endswith(".npy"):
            _check_npy_header(archive, info, path)


def _check_npy_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> None:
    name = info.filename[: -len(".npy")]
    try:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else (
                np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(member)
            header_bytes = member.tell()
    except Exception as exc:  # a bad magic string or header, a truncated or encrypted member
        raise DatasetError(f"{path}: array '{name}' is malformed ({type(exc).__name__}: {exc})") from None
    if dtype.hasobject:
        raise DatasetError(f"{path}: array '{name}' is an object array (pickled data); refused")
    declared = math.prod(shape) * dtype.itemsize
    if declared != info.file_size - header_bytes:
        raise DatasetError(
            f"{path}: array '{name}' declares {declared} bytes of data but its member holds "
            f"{info.file_size - header_bytes}"
        )


def _npz_array(archive: Any, key: str, path: Path) -> np.ndarray:
    if key not in archive.files:
        raise DatasetError(f"{path}: missing array '{key}' (found {sorted(archive.files)})")
    try:
        return np.asarray(archive[key])
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise DatasetError(f"{path}: array '{key}' is an object array (pickled data); refused") from None
        raise DatasetError(f"{path}: array '{key}' is malformed ({exc})") from None
    except Exception as exc:  # truncated members surface as zipfile/zlib/OS errors on access
        raise DatasetError(f"{path}: array '{key}' cannot be read ({type(exc).__name__}: {exc})") from None


def _npz_images(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    """3-4 dim arrays to uint8 NCHW: ``[N, H, W]`` gains a channel; ``[N, H, W, C]`` with C in
    (1, 3, 4) is transposed unless axis 1 already looks like channels."""
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
            raise DatasetError(f"{path}: '{key}' is a float image array with values outside [0, 1]")
        x = np.rint(x * 255.0).astype(np.uint8)
    elif np.issubdtype(x.dtype, np.integer) and x.dtype != np.uint8:
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DatasetError(f"{path}: '{key}' is an integer image array with values outside 0..255")
        x = x.astype(np.uint8)
    elif x.dtype != np.uint8:
        raise DatasetError(f"{path}: '{key}' has dtype {x.dtype}; images must be uint8 or float in [0, 1]")
    if x.ndim == 3:
        return x[:, None, :, :]
    first, last = x.shape[1], x.shape[3]
    channels = (1, 3, 4)
    # Both ends may look like channels (e.g. [N, 4, 4, 3]): prefer the smaller as channels.
    if first in channels and (last not in channels or first <= last):
        return np.ascontiguousarray(x)
    if last in channels:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise DatasetError(
        f"{path}: '{key}' has shape {x.shape}: cannot tell the channel axis (need 1, 3 or 4 channels "
        "first [N, C, H, W] or last [N, H, W, C])"
    )


def _npz_inputs(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    if x.dtype == object or x.dtype.kind not in "biuf":
        raise DatasetError(f"{path}: '{key}' has dtype {x.dtype}; expected numbers")
    if x.ndim == 2:
        features = x.astype(np.float32)
        if not np.isfinite(features).all():
            raise DatasetError(f"{path}: '{key}' holds NaN or infinite features")
        return features
    if x.ndim in (3, 4):
        return _npz_images(x, key, path)
    raise DatasetError(
        f"{path}: '{key}' has shape {x.shape}; expected features [N, D] or images [N, H, W] / 4-dim"
    )


def _npz_labels(y: np.ndarray, n: int, key: str, path: Path) -> np.ndarray:
    if y.ndim != 1 or y.shape[0] != n:
        raise DatasetError(f"{path}: '{key}' has shape {y.shape}; expected [{n}] to match the inputs")
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{path}: '{key}' has dtype {y.dtype}; labels must be integers")
    if y.size and y.min() < 0:
        raise DatasetError(f"{path}: '{key}' has negative labels; labels must be 0..num_classes-1")
    return y.astype(np.int64)


@register_dataset("npz")
def load_npz(spec: DatasetSpec, seed: int) -> Dataset:
    """A ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test`` (and optionally ``classes``,
    a string array of class names), read with ``allow_pickle=False``.

    Inputs: 2-dim numeric arrays are features (cast to float32); 3-4 dim arrays are images, made
    uint8 NCHW. Float images must lie in [0, 1] and are converted to uint8 by rounding ``x * 255``;
    integer images must lie in 0..255. ``num_classes`` is the largest label plus one.
    """
    path = require_path(spec)
    if not path.is_file():
        raise DatasetError(f"{path}: expected an .npz file, found a folder")
    # Open the file here rather than handing numpy the path: numpy leaks its own handle when the
    # archive turns out to be malformed.
    with path.open("rb") as fh:
        try:
            archive = np.load(fh, allow_pickle=False)
        except Exception as exc:  # not a zip, truncated central directory, a pickle, ...
            raise DatasetError(f"{path}: not an npz archive ({type(exc).__name__}: {exc})") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DatasetError(f"{path}: a single .npy array, not an npz archive with {', '.join(_NPZ_KEYS)}")
        with archive:
            if archive.zip is not None:  # None only once the NpzFile is closed
                check_npz_members(archive.zip, path)
            x_train = _npz_inputs(_npz_array(archive, "x_train", path), "x_train", path)
            x_test = _npz_inputs(_npz_array(archive, "x_test", path), "x_test", path)
            y_train = _npz_labels(_npz_array(archive, "y_train", path), x_train.shape[0], "y_train", path)
            y_test = _npz_labels(_npz_array(archive, "y_test", path), x_test.shape[0], "y_test", path)
            names = _npz_array(archive, "classes", path) if "classes" in archive.files else None
    if x_train.dtype != x_test.dtype or x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(
            f"{path}: x_train samples {x_train.dtype} {x_train.shape[1:]} and x_test samples "
            f"{x_test.dtype} {x_test.shape[1:]} differ"
        )
    if x_train.shape[0] == 0 or x_test.shape[0] == 0:
        raise DatasetError(f"{path}: x_train and x_test must not be empty")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    classes: list[str] | None = None
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US" or names.shape[0] != num_classes:
            raise DatasetError(f"{path}: 'classes' must be {num_classes} strings, got {names.dtype} {names.shape}")
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
    return Dataset.from_tensors(
        "npz",
        torch.from_numpy(x_train),
        labels_tensor(y_train),
        torch.from_numpy(x_test),
        labels_tensor(y_test),
        num_classes=num_classes,
        classes=classes,
    )
