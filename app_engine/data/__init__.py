"""Datasets: a registry of loaders that turn a :class:`~app_common.spec.DatasetSpec` into tensors.

One module per loader (``digits``, ``cifar``, ``imagefolder``, ``npz``, ``synthetic``), each
registering itself by the name a user writes in a job spec; :mod:`app_engine.data.base` holds the
:class:`Dataset` type, the registry and the helpers the loaders share. A new loader::

    @register_dataset("mine")
    def load_mine(spec: DatasetSpec, seed: int) -> Dataset: ...

A loader may also register a checker (``@register_checker("imagefolder")``) that reads the same
files with bounded memory; :func:`check_dataset` (what validating an upload calls) prefers it.

Files are untrusted input: CIFAR pickles are read with an unpickler that refuses every global except
the few numpy needs to rebuild an array, ``.npz`` archives are read with ``allow_pickle=False``, and
every missing, truncated or malformed file raises :class:`DatasetError` naming the file and the
problem. Nothing is downloaded.
"""

from __future__ import annotations

# Importing the loader modules registers them.
from app_engine.data import cifar, digits, imagefolder, npz, synthetic
from app_engine.data.base import (
    DATASET_CHECKERS,
    DATASET_LOADERS,
    MIN_STD,
    SPLIT_SEED,
    TEST_FRACTION,
    Dataset,
    DatasetError,
    DatasetLoader,
    DatasetSummary,
    channel_stats,
    check_dataset,
    list_datasets,
    load_dataset,
    register_checker,
    register_dataset,
    stratified_split,
)
from app_engine.data.disk_cache import DataOptions

__all__ = [
    "DATASET_CHECKERS",
    "DATASET_LOADERS",
    "DataOptions",
    "MIN_STD",
    "SPLIT_SEED",
    "TEST_FRACTION",
    "Dataset",
    "DatasetError",
    "DatasetLoader",
    "DatasetSummary",
    "channel_stats",
    "check_dataset",
    "cifar",
    "digits",
    "imagefolder",
    "list_datasets",
    "load_dataset",
    "npz",
    "register_checker",
    "register_dataset",
    "stratified_split",
    "synthetic",
]
