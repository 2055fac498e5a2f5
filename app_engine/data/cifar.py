"""CIFAR-10 / CIFAR-100 "python version" folders of pickled dicts, read without trusting the pickles.

The pickles are read with an unpickler that refuses every global except the few numpy needs to
rebuild an array; every missing, truncated or malformed file raises :class:`DatasetError` naming it.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from app_common.spec import DatasetSpec
from app_engine.data.base import Dataset, DatasetError, register_dataset, require_path


def _resolve_global(module: str, name: str) -> Any | None:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may name: what numpy needs to rebuild an ndarray.

    ``_reconstruct`` + ``ndarray`` + ``dtype`` is how numpy pickles an array up to protocol 4
    (the real CIFAR files, written by Python 2); protocol 5 uses ``_frombuffer``; a Python 3
    protocol-2 pickle stores bytes via ``_codecs.encode``. numpy 2 moved ``numpy.core`` to
    ``numpy._core``: both spellings map to the installed objects, resolved without importing the
    deprecated alias.
    """
    core = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
    reconstruct = _resolve_global(f"{core}.multiarray", "_reconstruct")
    frombuffer = _resolve_global(f"{core}.numeric", "_frombuffer")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _resolve_global("_codecs", "encode"),
    }
    for spelling in ("numpy.core", "numpy._core"):
        allowed[(f"{spelling}.multiarray", "_reconstruct")] = reconstruct
        if frombuffer is not None:
            allowed[(f"{spelling}.numeric", "_frombuffer")] = frombuffer
    return {key: value for key, value in allowed.items() if value is not None}


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build containers, strings, numbers and numpy arrays, and nothing else.

    ``find_class`` is the only way a pickle reaches a callable; refusing every name outside the
    allow-list means a hostile file cannot run code, only fail to load.
    """

    def __init__(self, file: BinaryIO) -> None:
        # latin1 maps Python 2 byte strings 1:1 onto str, which is what numpy expects for the raw
        # array data inside Python 2 pickles.
        super().__init__(file, encoding="latin1")
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return found


def _load_pickle(path: Path) -> dict[Any, Any]:
    """Read one CIFAR pickle safely; every failure becomes a DatasetError naming ``path``."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing file")
    try:
        with path.open("rb") as fh:
            obj = _RestrictedUnpickler(fh).load()
    except _ForbiddenGlobal as exc:
        raise DatasetError(
            f"{path}: refused to unpickle the global '{exc}' (only numpy arrays, dicts, lists, "
            "strings and numbers are allowed in a dataset pickle)"
        ) from None
    except EOFError:
        raise DatasetError(f"{path}: truncated pickle (the file ends early)") from None
    except pickle.UnpicklingError as exc:
        what = "truncated pickle" if "truncated" in str(exc) else "not a valid pickle"
        raise DatasetError(f"{path}: {what} ({exc})") from None
    except Exception as exc:  # a malformed stream can fail inside any opcode or numpy's setstate
        raise DatasetError(f"{path}: malformed pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _entry(d: Mapping[Any, Any], key: str, path: Path) -> Any:
    """``d[key]`` where the key may be str (Python 3 / latin1) or bytes (pickled with bytes keys)."""
    for candidate in (key, key.encode()):
        if candidate in d:
            return d[candidate]
    raise DatasetError(f"{path}: missing key '{key}' (found {sorted(str(k) for k in d)})")


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int


_CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
    ),
    "cifar100": _CifarLayout(
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
    ),
}


def is_cifar_folder(path: Path, name: str) -> bool:
    """Whether ``path`` looks like a ``name`` (cifar10/cifar100) ``dataset.path``: the batches
    folder itself or the folder that contains it (what :func:`_cifar_root` accepts)."""
    layout = _CIFAR_LAYOUTS[name]
    if not path.is_dir():
        return False
    return (path / layout.folder).is_dir() or any((path / f).exists() for f in (layout.meta_file, *layout.train_files))


def _cifar_root(path: Path, layout: _CifarLayout, name: str) -> Path:
    """``dataset.path`` may be the batches folder itself or the folder that contains it."""
    if path.is_dir() and any((path / f).exists() for f in (layout.meta_file, *layout.train_files)):
        return path
    if (path / layout.folder).is_dir():
        return path / layout.folder
    raise DatasetError(
        f"{path}: not a {name} folder: expected {layout.folder}/ or the files "
        f"{', '.join(layout.train_files + layout.test_files)}, {layout.meta_file}"
    )


def _cifar_part(path: Path, layout: _CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_pickle(path)
    data = _entry(batch, "data", path)
    labels = _entry(batch, layout.label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DatasetError(
            f"{path}: 'data' must be a uint8 array [N, 3072], got {type(data).__name__} "
            f"{getattr(data, 'dtype', '')} {shape}"
        )
    try:
        y = np.asarray(labels)
    except Exception as exc:
        raise DatasetError(f"{path}: '{layout.label_key}' is not a list of integers ({exc})") from None
    if y.ndim != 1 or y.shape[0] != data.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(
            f"{path}: '{layout.label_key}' must be {data.shape[0]} integers, got {y.dtype} {y.shape}"
        )
    if y.size and (y.min() < 0 or y.max() >= layout.num_classes):
        raise DatasetError(
            f"{path}: labels out of range {int(y.min())}..{int(y.max())} for {layout.num_classes} classes"
        )
    # Each row is three 32x32 planes (R, G, B), each row-major: a plain reshape gives NCHW.
    return data.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _load_cifar(spec: DatasetSpec, name: str) -> Dataset:
    layout = _CIFAR_LAYOUTS[name]
    root = _cifar_root(require_path(spec), layout, name)
    meta_path = root / layout.meta_file
    meta = _load_pickle(meta_path)
    names = _entry(meta, layout.names_key, meta_path)
    if not isinstance(names, list | tuple) or len(names) != layout.num_classes:
        raise DatasetError(f"{meta_path}: '{layout.names_key}' must list {layout.num_classes} class names")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def read(files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_cifar_part(root / f, layout) for f in files]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        return torch.from_numpy(x), torch.from_numpy(y)

    x_train, y_train = read(layout.train_files)
    x_test, y_test = read(layout.test_files)
    return Dataset.from_tensors(
        name, x_train, y_train, x_test, y_test, num_classes=layout.num_classes, classes=classes
    )


@register_dataset("cifar10")
def load_cifar10(spec: DatasetSpec, seed: int) -> Dataset:
    """CIFAR-10 python version: ``data_batch_1..5``, ``test_batch``, ``batches.meta`` (32x32 RGB)."""
    return _load_cifar(spec, "cifar10")


@register_dataset("cifar100")
def load_cifar100(spec: DatasetSpec, seed: int) -> Dataset:
    """CIFAR-100 python version: ``train``, ``test``, ``meta``; the 100 fine labels are used."""
    return _load_cifar(spec, "cifar100")
