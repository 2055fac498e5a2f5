"""digits: scikit-learn's bundled copy of the UCI 8x8 handwritten digits (no download)."""

from __future__ import annotations

import numpy as np
import torch

from app_common.spec import DatasetSpec
from app_engine.data.base import SPLIT_SEED, TEST_FRACTION, Dataset, labels_tensor, register_dataset, stratified_split


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
    y = labels_tensor(labels)
    return Dataset.from_tensors(
        "digits", x[train], y[train], x[test], y[test], num_classes=10, classes=[str(d) for d in range(10)]
    )
