"""Image folders: ``path/train/<class>/<image>``, optional ``path/test/<class>/<image>``."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from app_common.spec import DatasetSpec
from app_engine.data.base import (
    SPLIT_SEED,
    TEST_FRACTION,
    Dataset,
    DatasetError,
    DatasetSummary,
    register_checker,
    register_dataset,
    require_path,
    stratified_split,
)
from app_engine.data.disk_cache import content_key, current_options, decoded_array

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


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
            # Palette transparency must go through RGBA before RGB (Pillow warns otherwise).
            source = img.convert("RGBA") if img.mode in ("P", "PA") else img
            rgb = source.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(rgb, dtype=np.uint8)  # [H, W, 3]
    # DecompressionBombError: a small file declaring a huge image (Pillow's pixel limit).
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _class_files(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(file, label) of every image under ``root/<class>/``, classes in order, files sorted."""
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        found = _image_files(folder)
        if not found:
            raise DatasetError(f"{folder}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} files)")
        files.extend((f, label) for f in found)
    return files


def _decode_into(out: np.ndarray, files: list[Path], rows: list[int], size: int) -> None:
    """Decode ``files[i]`` into ``out[rows[i]]``, in the order of ``files`` (the first unreadable
    file in folder order is the one reported)."""
    for f, row in zip(files, rows, strict=True):
        out[row] = _read_image(f, size)


@dataclass(frozen=True)
class _Layout:
    """An image folder's files as the loader reads them: ``files[i]`` (label ``labels[i]``) is
    decoded ``i``-th and lands in row ``rows[i]`` of the array (train rows first, ``n_train`` of
    them, then test)."""

    classes: list[str]
    files: list[Path]
    labels: np.ndarray
    rows: list[int]
    n_train: int

    def summary(self, size: int) -> DatasetSummary:
        return DatasetSummary(train_samples=self.n_train, test_samples=len(self.files) - self.n_train,
                              num_classes=len(self.classes), classes=tuple(self.classes),
                              input_shape=(3, size, size))


def _layout(path: Path) -> _Layout:
    """The classes and files under ``path`` (``train/<class>/``, optional ``test/<class>/``), with
    every error of the folder's structure; no image is opened."""
    train_dir = path / "train"
    if not train_dir.is_dir():
        raise DatasetError(f"{train_dir}: missing folder (expected {path}/train/<class>/<image files>)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{train_dir}: no class folders")
    train = _class_files(train_dir, classes)
    test_dir = path / "test"
    if test_dir.is_dir():
        unknown = sorted(
            p.name for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in classes
        )
        if unknown:
            raise DatasetError(f"{test_dir}: class folders {unknown} have no counterpart in {train_dir}")
        test = _class_files(test_dir, classes)
        if not test:
            raise DatasetError(f"{test_dir}: no test images")
        listed = train + test
        rows = list(range(len(listed)))
        n_train = len(train)
    else:
        labels = np.fromiter((label for _, label in train), dtype=np.int64, count=len(train))
        train_idx, test_idx = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
        if test_idx.size == 0:
            raise DatasetError(f"{train_dir}: too few images to hold out a test split (need 2 per class)")
        # Decoded in folder order (the first unreadable file in that order is the one reported),
        # each into the row of its side of the split.
        listed = train
        rows = np.argsort(np.concatenate([train_idx, test_idx])).tolist()
        n_train = int(train_idx.size)
    labels = np.empty(len(listed), dtype=np.int64)
    labels[rows] = [label for _, label in listed]  # by row: train, then test
    return _Layout(classes=classes, files=[f for f, _ in listed], labels=labels, rows=rows, n_train=n_train)


@register_dataset("imagefolder")
def load_imagefolder(spec: DatasetSpec, seed: int) -> Dataset:
    """Images in ``path/train/<class>/`` (and ``path/test/<class>/``), read with Pillow as RGB and
    resized to ``spec.image_size`` squared. Classes are the sorted train sub-folder names. Without a
    ``test/`` folder a stratified 20 % of train is held out, fixed by SPLIT_SEED.

    The images are decoded into one uint8 array, train then test. A set whose array is larger than
    the memory cap (:mod:`app_engine.data.disk_cache`) is decoded once into a memory-mapped file in
    the cache folder, reused while the folder is unchanged, and the dataset is ``streamed``.
    """
    path = require_path(spec)
    layout = _layout(path)
    size = spec.image_size
    shape = (len(layout.files), 3, size, size)
    options = current_options()
    streamed = math.prod(shape) > options.memory_cap_bytes
    if streamed and options.cache_dir is None:
        log.warning("%s: %d bytes decoded exceed the memory cap of %d, but no cache folder is set: "
                    "loading into memory", path, math.prod(shape), options.memory_cap_bytes)
        streamed = False
    fill = partial(_decode_into, files=layout.files, rows=layout.rows, size=size)
    if streamed:
        # Files in row order (train, then test): which file lands where is part of the content.
        by_row = [layout.files[i] for i in np.argsort(layout.rows)]
        key = content_key(path, by_row, size, layout.n_train)
        x = decoded_array(options, path, key, shape, fill)
    else:
        x = np.empty(shape, dtype=np.uint8)
        fill(x)
    n, y = layout.n_train, layout.labels
    return Dataset.from_tensors(
        "imagefolder",
        torch.from_numpy(x[:n]),
        torch.from_numpy(y[:n]),
        torch.from_numpy(x[n:]),
        torch.from_numpy(y[n:]),
        num_classes=len(layout.classes),
        classes=layout.classes,
        streamed=streamed,
    )


@register_checker("imagefolder")
def check_imagefolder(spec: DatasetSpec) -> DatasetSummary:
    """Open and decode every image the loader would, in the loader's order, one at a time: the
    same first error, and memory for one image whatever the folder's size (validating an upload)."""
    path = require_path(spec)
    layout = _layout(path)
    for f in layout.files:
        _read_image(f, spec.image_size)
    return layout.summary(spec.image_size)
