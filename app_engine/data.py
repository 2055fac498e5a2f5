"""Datasets: a registry of loaders that turn a :class:`~app_common.spec.DatasetSpec` into tensors.

Every loader returns a :class:`Dataset` with the whole train and test splits in memory as tensors
(images uint8 ``[N, C, H, W]``, tabular features float32 ``[N, D]``, labels int64 ``[N]``), so the
trainer can move them to the device once and index batches there. Normalisation statistics are
computed from the training split only and travel with the data; models normalise their own input.

Loaders are registered by the names a user writes in a job spec::

    @register_dataset("digits")
    def load_digits(spec: DatasetSpec, seed: int) -> Dataset: ...

Files are untrusted input: CIFAR pickles are read with an unpickler that refuses every global except
the few numpy needs to rebuild an array, ``.npz`` archives are read with ``allow_pickle=False``, and
every missing, truncated or malformed file raises :class:`DatasetError` naming the file and the
problem. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
import logging
import math
import pickle
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from app_common.spec import DatasetSpec
from app_engine.errors import RunInputError
from app_engine.registry import Registry

logger = logging.getLogger(__name__)

# The held-out test split of datasets that ship without one (digits, image folders without test/)
# uses this seed whatever the run seed, so that every run is scored on the same test set.
SPLIT_SEED = 0
TEST_FRACTION = 0.2
# Standard deviations below this are treated as "constant": the feature is left unscaled (std 1),
# as scikit-learn's StandardScaler does, rather than divided by a near-zero number.
MIN_STD = 1e-6
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DatasetError(RunInputError):
    """A dataset that cannot be loaded; the message names the file and what is wrong with it."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test splits as tensors, with what a model needs to know about them.

    ``mean`` and ``std`` are per channel in units of ``x / 255`` for images and per feature for
    float features, computed on the training split. ``classes`` are the class names (``"0"``,
    ``"1"``, ... when the source has none). ``eq=False``: tensors have no single truth value, so
    datasets compare by identity.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    is_image: bool
    classes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        _check_split(self, "train", self.x_train, self.y_train)
        _check_split(self, "test", self.x_test, self.y_test)
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DatasetError(
                f"{self.name}: train samples have shape {tuple(self.x_train.shape[1:])} "
                f"but test samples {tuple(self.x_test.shape[1:])}"
            )
        width = self.x_train.shape[1]  # channels of an image, features of a table
        if len(self.mean) != width or len(self.std) != width:
            raise DatasetError(f"{self.name}: mean and std need {width} entries, one per channel/feature")
        if not self.classes:
            object.__setattr__(self, "classes", tuple(str(c) for c in range(self.num_classes)))
        elif len(self.classes) != self.num_classes:
            raise DatasetError(f"{self.name}: {len(self.classes)} class names for {self.num_classes} classes")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample: ``(C, H, W)`` for images, ``(D,)`` for features."""
        return tuple(self.x_train.shape[1:])

    @classmethod
    def from_tensors(
        cls,
        name: str,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        *,
        num_classes: int | None = None,
        classes: Iterable[str] | None = None,
    ) -> Dataset:
        """Build a dataset from tensors, computing ``mean``/``std`` from the training split.

        uint8 inputs are images ``[N, C, H, W]``; anything else must be float32 features ``[N, D]``.
        ``num_classes`` defaults to the largest label (train or test) plus one.
        """
        names = tuple(classes) if classes is not None else ()
        if num_classes is None:
            num_classes = len(names) if names else _num_classes(y_train, y_test)
        mean, std = channel_stats(x_train)
        return cls(
            name=name,
            x_train=x_train,
            y_train=y_train,
            x_test=x_test,
            y_test=y_test,
            num_classes=num_classes,
            mean=mean,
            std=std,
            is_image=x_train.dtype == torch.uint8,
            classes=names,
        )


def _check_split(ds: Dataset, split: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if ds.is_image and (x.dtype != torch.uint8 or x.dim() != 4):
        raise DatasetError(f"{ds.name}: {split} images must be uint8 [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
    if not ds.is_image and (x.dtype != torch.float32 or x.dim() != 2):
        raise DatasetError(
            f"{ds.name}: {split} features must be float32 [N, D], got {x.dtype} {tuple(x.shape)}"
        )
    if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise DatasetError(
            f"{ds.name}: {split} labels must be int64 [{x.shape[0]}], got {y.dtype} {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise DatasetError(f"{ds.name}: the {split} split is empty")
    if ds.num_classes < 1:
        raise DatasetError(f"{ds.name}: num_classes must be at least 1")
    if int(y.min()) < 0 or int(y.max()) >= ds.num_classes:
        raise DatasetError(
            f"{ds.name}: {split} labels out of range: {int(y.min())}..{int(y.max())} "
            f"for {ds.num_classes} classes"
        )


def _num_classes(*labels: torch.Tensor) -> int:
    return max(int(y.max()) for y in labels) + 1


def channel_stats(x: torch.Tensor, chunk: int = 2048) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation per channel (uint8 images, in units of x/255) or per feature.

    Accumulates sum and sum of squares in float64 over chunks of samples, so a 50 000-image CIFAR
    split never exists as one float copy. std is the population std; a (near-)constant channel gets
    std 1 so normalising it is a shift, not a division by ~0.
    """
    if x.shape[0] == 0:
        raise DatasetError("cannot compute statistics of an empty split")
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    # Reduce over every axis except the channel/feature axis 1: images [N, C, H, W], features [N, D].
    axes = (0, *range(2, x.dim()))
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].to(torch.float64) / scale
        total += part.sum(dim=axes)
        total_sq += (part * part).sum(dim=axes)
    count = x.numel() // x.shape[1]
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    std = var.sqrt()
    std = torch.where(std < MIN_STD, torch.ones_like(std), std)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# --------------------------------------------------------------------------------------------------
# Registry

DatasetLoader = Callable[[DatasetSpec, int], Dataset]
DATASET_LOADERS: Registry[DatasetLoader] = Registry("dataset")


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Register a loader ``fn(spec, seed) -> Dataset`` under the name used in job specs."""
    return DATASET_LOADERS.register(name)


def list_datasets() -> list[str]:
    return sorted(DATASET_LOADERS)


def load_dataset(spec: DatasetSpec, seed: int) -> Dataset:
    """Load the dataset a job spec names. ``seed`` only matters for seeded datasets (synthetic);
    held-out test splits use :data:`SPLIT_SEED` so they never depend on the run seed."""
    loader = DATASET_LOADERS.get(spec.name)
    if loader is None:
        raise DatasetError(f"unknown dataset '{spec.name}'; known: {', '.join(list_datasets())}")
    ds = loader(spec, seed)
    logger.info(
        "dataset %s: %d train, %d test, input %s, %d classes",
        ds.name,
        ds.x_train.shape[0],
        ds.x_test.shape[0],
        ds.input_shape,
        ds.num_classes,
    )
    return ds


# --------------------------------------------------------------------------------------------------
# Helpers shared by the loaders


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split into sorted (train, test) index arrays.

    Each class with n >= 2 samples sends round(n * test_fraction) of them (at least 1, at most
    n - 1) to the test side; a class with a single sample stays in train.
    """
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        n_test = min(max(round(idx.size * test_fraction), 1), idx.size - 1) if idx.size >= 2 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _require_path(spec: DatasetSpec) -> Path:
    if not spec.path:
        raise DatasetError(f"dataset '{spec.name}' reads files: dataset.path is required")
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder (dataset.path of '{spec.name}')")
    return path


def _labels_tensor(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))


# --------------------------------------------------------------------------------------------------
# digits (scikit-learn's bundled copy of the UCI 8x8 handwritten digits; no download)


@register_dataset("digits")
def load_digits(spec: DatasetSpec, seed: int) -> Dataset:
    """1797 8x8 grey images, 10 classes; 20 % held out by a stratified split fixed by SPLIT_SEED."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    # Pixels are counts 0..16 of a 4x4 block downsampling; rescale to the 0..255 of every image set.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]  # [N, 1, 8, 8]
    labels = bunch.target.astype(np.int64)
    train, test = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    x = torch.from_numpy(images)
    y = _labels_tensor(labels)
    return Dataset.from_tensors(
        "digits", x[train], y[train], x[test], y[test], num_classes=10, classes=[str(d) for d in range(10)]
    )


# --------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100, "python version" folders of pickled dicts


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
    root = _cifar_root(_require_path(spec), layout, name)
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


# --------------------------------------------------------------------------------------------------
# Image folders: path/train/<class>/<image>, optional path/test/<class>/<image>


def _image_files(folder: Path) -> list[Path]:
    # Hidden files are skipped: macOS leaves "._name.jpg" metadata files that are not images.
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _read_image(path: Path, size: int) -> np.ndarray:
    """One image as uint8 ``[3, size, size]``: RGB, resized (bilinear) to a square."""
    try:
        with Image.open(path) as img:
            # JPEG can decode directly at a reduced scale (>= size): far faster for large photos.
            img.draft("RGB", (size, size))
            if img.mode in ("P", "PA"):
                # Palette transparency must go through RGBA before RGB (Pillow warns otherwise).
                img = img.convert("RGBA")
            rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(rgb, dtype=np.uint8)  # [H, W, 3]
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _read_class_folders(
    root: Path, classes: list[str], size: int
) -> tuple[np.ndarray, np.ndarray]:
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        found = _image_files(folder)
        if not found:
            raise DatasetError(f"{folder}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} files)")
        files.extend((f, label) for f in found)
    x = np.empty((len(files), 3, size, size), dtype=np.uint8)
    for i, (f, _) in enumerate(files):
        x[i] = _read_image(f, size)
    y = np.fromiter((label for _, label in files), dtype=np.int64, count=len(files))
    return x, y


@register_dataset("imagefolder")
def load_imagefolder(spec: DatasetSpec, seed: int) -> Dataset:
    """Images in ``path/train/<class>/`` (and ``path/test/<class>/``), read with Pillow as RGB and
    resized to ``spec.image_size`` squared. Classes are the sorted train sub-folder names. Without a
    ``test/`` folder a stratified 20 % of train is held out, fixed by SPLIT_SEED."""
    path = _require_path(spec)
    train_dir = path / "train"
    if not train_dir.is_dir():
        raise DatasetError(f"{train_dir}: missing folder (expected {path}/train/<class>/<image files>)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{train_dir}: no class folders")
    x, y = _read_class_folders(train_dir, classes, spec.image_size)
    test_dir = path / "test"
    if test_dir.is_dir():
        unknown = sorted(
            p.name for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in classes
        )
        if unknown:
            raise DatasetError(f"{test_dir}: class folders {unknown} have no counterpart in {train_dir}")
        x_test, y_test = _read_class_folders(test_dir, classes, spec.image_size)
        if x_test.shape[0] == 0:
            raise DatasetError(f"{test_dir}: no test images")
        x_train, y_train = x, y
    else:
        train, test = stratified_split(y, TEST_FRACTION, SPLIT_SEED)
        if test.size == 0:
            raise DatasetError(f"{train_dir}: too few images to hold out a test split (need 2 per class)")
        x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
    return Dataset.from_tensors(
        "imagefolder",
        torch.from_numpy(x_train),
        torch.from_numpy(y_train),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test),
        num_classes=len(classes),
        classes=classes,
    )


# --------------------------------------------------------------------------------------------------
# npz archives


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


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
    path = _require_path(spec)
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
        _labels_tensor(y_train),
        torch.from_numpy(x_test),
        _labels_tensor(y_test),
        num_classes=num_classes,
        classes=classes,
    )


# --------------------------------------------------------------------------------------------------
# synthetic: a seeded, learnable image problem for tests and demos

SYNTHETIC_CLASSES = 10
SYNTHETIC_SHAPE = (3, 8, 8)
SYNTHETIC_TEST_FRACTION = 0.25


@register_dataset("synthetic")
def load_synthetic(spec: DatasetSpec, seed: int) -> Dataset:
    """10 classes of 3x8x8 uint8 images: a class prototype plus per-sample noise.

    A prototype is a class colour (one value per channel) plus a smooth spatial pattern (a random
    2x2 grid upsampled to 8x8), so both pooling and spatially aware models can separate classes.
    Samples add Gaussian pixel noise (std 55 of 255) and a random brightness shift (std 20): a small
    CNN reaches about 65-85 % test accuracy after one or two epochs on 2000 samples (chance is
    10 %), so the curves still have room to move over a stream. ``spec.synthetic_samples`` training samples and a
    quarter as many test samples; everything follows from ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    c, h, w = SYNTHETIC_SHAPE
    colour = torch.rand(SYNTHETIC_CLASSES, c, 1, 1, generator=gen) * 80.0 - 40.0
    coarse = torch.rand(SYNTHETIC_CLASSES, c, 2, 2, generator=gen) * 80.0 - 40.0
    pattern = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    prototypes = 128.0 + colour + pattern  # [K, C, H, W] in 48..208

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Balanced labels (each class n // K or one more), in a seeded order.
        labels = torch.arange(n) % SYNTHETIC_CLASSES
        labels = labels[torch.randperm(n, generator=gen)]
        noise = torch.randn(n, c, h, w, generator=gen) * 55.0
        shift = torch.randn(n, 1, 1, 1, generator=gen) * 20.0
        x = (prototypes[labels] + noise + shift).round().clamp(0, 255).to(torch.uint8)
        return x, labels.to(torch.int64)

    x_train, y_train = draw(spec.synthetic_samples)
    x_test, y_test = draw(max(SYNTHETIC_CLASSES, math.ceil(spec.synthetic_samples * SYNTHETIC_TEST_FRACTION)))
    return Dataset.from_tensors(
        "synthetic",
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes=SYNTHETIC_CLASSES,
        classes=[f"class_{k}" for k in range(SYNTHETIC_CLASSES)],
    )
