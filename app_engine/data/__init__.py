"""Datasets: a registry of loaders that turn a :class:`~app_common.spec.DatasetSpec` into tensors.

One module per loader (``digits``, ``cifar``, ``imagefolder``, ``npz``, ``synthetic``), each
registering itself by the name a user writes in a job spec; :mod:`app_engine.data.base` holds the
:class:`Dataset` type, the registry and the helpers the loaders share. A new loader::

    @register_dataset("mine")
    def load_mine(spec: DatasetSpec, seed: int) -> Dataset: ...

Files are untrusted input: CIFAR pickles are read with an unpickler that refuses every global except
the few numpy needs to rebuild an array, ``.npz`` archives are read with ``allow_pickle=False``, and
every missing, truncated or malformed file raises :class:`DatasetError` naming the file and the
problem. Nothing is downloaded.
"""

from __future__ import annotations

# Importing the loader modules registers them.
from app_engine.data import cifar, digits, imagefolder, npz, synthetic
from app_engine.data.base import (
    DATASET_LOADERS,
    MIN_STD,
    SPLIT_SEED,
    TEST_FRACTION,
    Dataset,
    DatasetError,
    DatasetLoader,
    channel_stats,
    list_datasets,
    load_dataset,
    register_dataset,
    stratified_split,
)
from app_engine.data.disk_cache import DataOptions

__all__ = [
    "DATASET_LOADERS",
    "DataOptions",
    "MIN_STD",
    "SPLIT_SEED",
    "TEST_FRACTION",
    "Dataset",
    "DatasetError",
    "DatasetLoader",
    "channel_stats",
    "cifar",
    "digits",
    "imagefolder",
    "list_datasets",
    "load_dataset",
    "npz",
    "register_dataset",
    "stratified_split",
    "synthetic",
]
