"""Image folders: ``path/train/<class>/<image>``, optional ``path/test/<class>/<image>``."""

from __future__ import annotations

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
    register_dataset,
    require_path,
    stratified_split,
)

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
    path = require_path(spec)
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
