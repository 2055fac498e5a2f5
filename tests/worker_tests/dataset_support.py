"""What the worker's dataset tests share: a small real .npz (digits) and a dataset record in a store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from app_common.datasets import DatasetRecord
from app_common.storage import Storage, dataset_key
from app_common.store import JobStore


def digits_npz(path: Path, n_train: int = 300, n_test: int = 100) -> Path:
    """Digits in the layout the npz loader reads: uint8 images [N, 8, 8], integer labels."""
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    with path.open("wb") as fh:
        np.savez_compressed(fh, x_train=images[:n_train], y_train=bunch.target[:n_train],
                            x_test=images[n_train:n_train + n_test], y_test=bunch.target[n_train:n_train + n_test])
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def uploaded(store: JobStore, storage: Storage, path: Path, *, fmt: str = "npz", owner: str = "key_a",
             sha256: str | None = None, status: str = "validating") -> DatasetRecord:
    """A dataset record whose file ``path`` is in ``storage``, moved to ``status`` (validating or ready)."""
    record = store.create_dataset(owner, name=path.name, format=fmt, sha256=sha256 or sha256_of(path),
                                  bytes=path.stat().st_size)
    storage.put_file(dataset_key(record.id), path)
    assert store.move_dataset(record.id, "validating", allowed_from={"uploading"})
    if status == "ready":
        from app_common.datasets import DatasetInfo

        info = DatasetInfo(train_samples=1, test_samples=1, num_classes=1, classes=["0"], input_shape=[1])
        assert store.set_dataset_ready(record.id, info)
    found = store.get_dataset(record.id)
    assert found is not None
    return found
