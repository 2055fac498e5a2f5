"""The dataset type, the loader registry and the helpers the loaders share.

Every loader returns a :class:`Dataset` with the whole train and test splits in memory as tensors
(images uint8 ``[N, C, H, W]``, tabular features float32 ``[N, D]``, labels int64 ``[N]``), so the
trainer can move them to the device once and index batches there (a set larger than the memory
cap is a ``streamed`` dataset over a memory-mapped file instead, see
:mod:`app_engine.data.disk_cache`). Normalisation statistics are
computed from the training split only and travel with the data; models normalise their own input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from app_common.spec import DatasetSpec
from app_engine.data.disk_cache import DataOptions, using_options
from app_engine.errors import RunInputError
from app_engine.registry import Registry

logger = logging.getLogger(__name__)

SPLIT_SEED = 0
TEST_FRACTION = 0.2
# Standard deviations below this are treated as "constant": the feature is left unscaled (std 1),
# as scikit-learn's StandardScaler does, rather than divided by a near-zero number.
MIN_STD = 1e-6


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
    # True when the splits are CPU tensors over a memory-mapped file (a set larger than the memory
    # cap, app_engine.data.disk_cache): the trainer moves batches to the device, not the whole set.
    streamed: bool = False

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
        streamed: bool = False,
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
            streamed=streamed,
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


def load_dataset(spec: DatasetSpec, seed: int, *, options: DataOptions | None = None) -> Dataset:
    """Load the dataset a job spec names. ``seed`` only matters for seeded datasets (synthetic);
    held-out test splits use :data:`SPLIT_SEED` so they never depend on the run seed.

    ``options`` say where a set too large for memory goes (:mod:`app_engine.data.disk_cache`;
    by default into memory all the same)."""
    loader = DATASET_LOADERS.get(spec.name)
    if loader is None:
        raise DatasetError(f"unknown dataset '{spec.name}'; known: {', '.join(list_datasets())}")
    with using_options(options or DataOptions()):
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


@dataclass(frozen=True)
class DatasetSummary:
    """What loading a dataset gives, without the data: sample counts, classes, one sample's shape."""

    train_samples: int
    test_samples: int
    num_classes: int
    classes: tuple[str, ...]
    input_shape: tuple[int, ...]

    @classmethod
    def of(cls, ds: Dataset) -> DatasetSummary:
        return cls(train_samples=int(ds.y_train.shape[0]), test_samples=int(ds.y_test.shape[0]),
                   num_classes=ds.num_classes, classes=ds.classes, input_shape=ds.input_shape)


# A checker reads every file a loader would and raises the same DatasetError on the same first bad
# file, but holds one sample at a time: for loaders whose decoded set can be far larger than the
# files (an image folder of JPEGs), so that checking an upload needs no more memory than one image.
DatasetChecker = Callable[[DatasetSpec], DatasetSummary]
DATASET_CHECKERS: Registry[DatasetChecker] = Registry("dataset checker")


def register_checker(name: str) -> Callable[[DatasetChecker], DatasetChecker]:
    """Register a bounded-memory checker ``fn(spec) -> DatasetSummary`` for the loader ``name``."""
    return DATASET_CHECKERS.register(name)


def check_dataset(spec: DatasetSpec) -> DatasetSummary:
    """Read the dataset ``spec`` names as its loader would and summarise it, raising the loader's
    :class:`DatasetError` for a bad file. With a registered checker (``imagefolder``) the memory
    used stays bounded by one sample; other loaders load the set (its size is that of the files)."""
    checker = DATASET_CHECKERS.get(spec.name)
    if checker is not None:
        return checker(spec)
    return DatasetSummary.of(load_dataset(spec, seed=0))


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


def require_path(spec: DatasetSpec) -> Path:
    if not spec.path:
        raise DatasetError(f"dataset '{spec.name}' reads files: dataset.path is required")
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder (dataset.path of '{spec.name}')")
    return path


def labels_tensor(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
