"""Dataset loaders: real (tiny) files in the real formats, the numbers they produce, and the errors."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from app_common.spec import DATASETS, DatasetSpec
from app_engine.data import (
    DATASET_LOADERS,
    Dataset,
    DatasetError,
    DatasetSummary,
    channel_stats,
    check_dataset,
    list_datasets,
    load_dataset,
    stratified_split,
)


def spec(name: str, path: Path | str | None = None, **kw: Any) -> DatasetSpec:
    return DatasetSpec(name=name, path=str(path) if path is not None else None, **kw)


def numpy_channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference statistics for uint8 NCHW images in units of x/255."""
    f = x.astype(np.float64) / 255.0
    return f.mean(axis=(0, 2, 3)), f.std(axis=(0, 2, 3))


# --------------------------------------------------------------------------------------------------
# registry


def test_registry_keys_are_the_spec_names() -> None:
    assert set(DATASET_LOADERS) == set(DATASETS)
    assert list_datasets() == sorted(DATASETS)


# --------------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(spec("digits"), seed=1)


def test_digits_shapes_and_range(digits: Dataset) -> None:
    assert digits.x_train.shape[0] + digits.x_test.shape[0] == 1797
    assert digits.input_shape == (1, 8, 8)
    assert digits.is_image and digits.x_train.dtype == torch.uint8 and digits.y_train.dtype == torch.int64
    assert digits.num_classes == 10 and digits.classes == tuple(str(d) for d in range(10))
    # 0..16 scaled to 0..255: both ends occur, and every value is round(v * 255 / 16).
    values = torch.unique(torch.cat([digits.x_train.flatten(), digits.x_test.flatten()]))
    assert int(values.min()) == 0 and int(values.max()) == 255
    assert set(values.tolist()) <= {round(v * 255 / 16) for v in range(17)}
    # A stratified 20 % split: every class is ~20 % test.
    assert digits.x_test.shape[0] == pytest.approx(0.2 * 1797, abs=10)
    for c in range(10):
        n_test, n_train = int((digits.y_test == c).sum()), int((digits.y_train == c).sum())
        assert n_test / (n_test + n_train) == pytest.approx(0.2, abs=0.02)
    mean, std = numpy_channel_stats(digits.x_train.numpy())
    assert digits.mean == pytest.approx(tuple(mean), abs=1e-9)
    assert digits.std == pytest.approx(tuple(std), abs=1e-9)


def test_digits_test_split_does_not_depend_on_the_run_seed(digits: Dataset) -> None:
    other = load_dataset(spec("digits"), seed=12345)
    assert torch.equal(other.x_test, digits.x_test) and torch.equal(other.y_test, digits.y_test)
    assert torch.equal(other.x_train, digits.x_train)


def test_stratified_split_is_seeded_and_disjoint() -> None:
    labels = np.repeat(np.arange(4), [10, 5, 2, 1])
    train, test = stratified_split(labels, 0.2, seed=3)
    assert np.intersect1d(train, test).size == 0 and np.union1d(train, test).size == labels.size
    assert np.bincount(labels[test], minlength=4).tolist() == [2, 1, 1, 0]
    again, _ = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(train, again)


# --------------------------------------------------------------------------------------------------
# CIFAR: tiny folders in the real layout


def write_pickle(path: Path, obj: Any, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)


def make_cifar10(root: Path, rng: np.random.Generator, per_batch: int = 4, n_test: int = 6) -> dict[str, Any]:
    """``root/cifar-10-batches-py`` with 5 train batches, a test batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        batches.append((data, labels))
        write_pickle(
            folder / f"data_batch_{i}",
            {"batch_label": f"training batch {i} of 5", "labels": labels, "data": data,
             "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)]},
        )
    test_data = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, size=n_test).tolist()
    write_pickle(
        folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test_labels, "data": test_data}
    )
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    write_pickle(folder / "batches.meta", {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072})
    return {"batches": batches, "test": (test_data, test_labels), "names": names, "folder": folder}


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    made = make_cifar10(tmp_path, np.random.default_rng(0))
    return tmp_path, made


def test_cifar10_loads_the_real_layout(cifar10_dir: tuple[Path, dict[str, Any]]) -> None:
    root, made = cifar10_dir
    ds = load_dataset(spec("cifar10", root), seed=1)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    assert ds.num_classes == 10 and ds.classes == tuple(made["names"]) and ds.input_shape == (3, 32, 32)
    data = np.concatenate([b[0] for b in made["batches"]])
    labels = sum((b[1] for b in made["batches"]), [])
    assert ds.y_train.tolist() == labels and ds.y_test.tolist() == made["test"][1]
    # Rows are R, G, B planes of 32x32, row-major: pixel (c, h, w) of sample i is column c*1024 + h*32 + w.
    for i, c, h, w in [(0, 0, 0, 0), (7, 1, 5, 31), (19, 2, 31, 17)]:
        assert int(ds.x_train[i, c, h, w]) == int(data[i, c * 1024 + h * 32 + w])
    mean, std = numpy_channel_stats(data.reshape(-1, 3, 32, 32))
    assert ds.mean == pytest.approx(tuple(mean), abs=1e-9) and ds.std == pytest.approx(tuple(std), abs=1e-9)
    # The batches folder itself works as dataset.path too.
    same = load_dataset(spec("cifar10", made["folder"]), seed=1)
    assert torch.equal(same.x_train, ds.x_train) and torch.equal(same.y_test, ds.y_test)


def make_cifar100(root: Path, rng: np.random.Generator, n_train: int = 12, n_test: int = 5) -> dict[str, Any]:
    """``root/cifar-100-python`` with bytes keys and protocol 2, like a Python-2-era pickle."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out: dict[str, Any] = {"folder": folder}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n).tolist()
        coarse = [f // 5 for f in fine]
        write_pickle(
            folder / name,
            {b"filenames": [b"x.png"] * n, b"batch_label": b"x", b"fine_labels": fine, b"coarse_labels": coarse,
             b"data": data},
            protocol=2,
        )
        out[name] = (data, fine)
    names = [f"class_{i:02d}".encode() for i in range(100)]
    write_pickle(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20}, protocol=2)
    return out


def test_cifar100_with_bytes_keys(tmp_path: Path) -> None:
    made = make_cifar100(tmp_path, np.random.default_rng(1))
    ds = load_dataset(spec("cifar100", tmp_path), seed=1)
    assert ds.num_classes == 100 and ds.classes[:2] == ("class_00", "class_01")
    assert ds.x_train.shape == (12, 3, 32, 32) and ds.x_test.shape == (5, 3, 32, 32)
    assert ds.y_train.tolist() == made["train"][1] and ds.y_test.tolist() == made["test"][1]
    assert np.array_equal(ds.x_test.numpy().reshape(5, 3072), made["test"][0])


# A pickle written by Python 2's cPickle (protocol 2), as the real CIFAR files are: keys and the raw
# array data are 8-bit strings (opcodes U/T), and the array is rebuilt via numpy.core.multiarray.
def _py2_str(b: bytes) -> bytes:
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b


def _py2_int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _py2_array(a: np.ndarray) -> bytes:
    shape = b"(" + b"".join(_py2_int(d) for d in a.shape) + b"t"
    dtype = (
        b"cnumpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R"
        + b"(" + _py2_int(3) + _py2_str(b"|") + b"NNN" + _py2_int(-1) + _py2_int(-1) + _py2_int(0) + b"tb"
    )
    return (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2_int(0) + b"\x85" + _py2_str(b"b") + b"\x87R"
        + b"(" + _py2_int(1) + shape + dtype + b"\x89" + _py2_str(a.tobytes()) + b"tb"
    )


def _py2_dict(items: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x80\x02}(" + b"".join(_py2_str(k) + v for k, v in items) + b"u."


def _py2_list(values: list[bytes]) -> bytes:
    return b"](" + b"".join(values) + b"e"


def test_cifar10_python2_pickles(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=3).tolist()
        expected.append((data, labels))
        blob = _py2_dict([(b"data", _py2_array(data)), (b"labels", _py2_list([_py2_int(v) for v in labels]))])
        (folder / name).write_bytes(blob)
    names = [_py2_str(f"n{i}".encode()) for i in range(10)]
    (folder / "batches.meta").write_bytes(_py2_dict([(b"label_names", _py2_list(names))]))
    ds = load_dataset(spec("cifar10", tmp_path), seed=1)
    assert ds.classes == tuple(f"n{i}" for i in range(10))
    assert np.array_equal(ds.x_train.numpy().reshape(15, 3072), np.concatenate([e[0] for e in expected[:5]]))
    assert ds.y_test.tolist() == expected[5][1]


def test_cifar_pickle_protocol_5(tmp_path: Path) -> None:
    made = make_cifar10(tmp_path, np.random.default_rng(3))
    data, labels = made["batches"][2]
    write_pickle(made["folder"] / "data_batch_3", {"data": data, "labels": labels}, protocol=5)
    ds = load_dataset(spec("cifar10", tmp_path), seed=1)
    assert np.array_equal(ds.x_train[8:12].numpy().reshape(4, 3072), data)


def test_cifar_missing_path_and_missing_file(cifar10_dir: tuple[Path, dict[str, Any]]) -> None:
    root, made = cifar10_dir
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_dataset(spec("cifar10", root / "nowhere"), seed=1)
    with pytest.raises(DatasetError, match="not a cifar100 folder"):
        load_dataset(spec("cifar100", root), seed=1)
    (made["folder"] / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"data_batch_3: missing file"):
        load_dataset(spec("cifar10", root), seed=1)


def test_cifar_truncated_pickle(cifar10_dir: tuple[Path, dict[str, Any]]) -> None:
    root, made = cifar10_dir
    target = made["folder"] / "data_batch_2"
    blob = target.read_bytes()
    target.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match=r"data_batch_2: truncated pickle"):
        load_dataset(spec("cifar10", root), seed=1)
    target.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"data_batch_2: truncated pickle"):
        load_dataset(spec("cifar10", root), seed=1)
    target.write_bytes(b"this is not a pickle at all")
    with pytest.raises(DatasetError, match=r"data_batch_2: not a valid pickle"):
        load_dataset(spec("cifar10", root), seed=1)


class _Exploit:
    """Unpickling this object would run a shell command (if the loader allowed the global)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


class _EvalExploit:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_malicious_pickle_is_refused_and_nothing_runs(
    cifar10_dir: tuple[Path, dict[str, Any]], protocol: int
) -> None:
    root, made = cifar10_dir
    marker = root / "pwned"
    write_pickle(made["folder"] / "data_batch_1", {"data": _Exploit(marker), "labels": [0]}, protocol=protocol)
    with pytest.raises(DatasetError, match=r"data_batch_1: refused to unpickle the global '(posix|os)\.system'"):
        load_dataset(spec("cifar10", root), seed=1)
    assert not marker.exists()
    write_pickle(made["folder"] / "batches.meta", {"label_names": _EvalExploit()}, protocol=protocol)
    # Protocol 2 spells the builtins module the Python 2 way, __builtin__.
    refused_eval = r"batches.meta: refused to unpickle the global '(builtins|__builtin__)\.eval'"
    with pytest.raises(DatasetError, match=refused_eval):
        load_dataset(spec("cifar10", root), seed=1)


def test_cifar_malformed_contents(cifar10_dir: tuple[Path, dict[str, Any]]) -> None:
    root, made = cifar10_dir
    target = made["folder"] / "data_batch_4"
    # An object array passes through the allowed numpy globals but is not image data.
    write_pickle(target, {"data": np.array([[1, "a"]], dtype=object), "labels": [0]})
    with pytest.raises(DatasetError, match=r"data_batch_4: 'data' must be a uint8 array \[N, 3072\]"):
        load_dataset(spec("cifar10", root), seed=1)
    write_pickle(target, {"data": np.zeros((2, 100), dtype=np.uint8), "labels": [0, 1]})
    with pytest.raises(DatasetError, match=r"data_batch_4: 'data' must be a uint8 array"):
        load_dataset(spec("cifar10", root), seed=1)
    write_pickle(target, {"data": np.zeros((2, 3072), dtype=np.uint8)})
    with pytest.raises(DatasetError, match=r"data_batch_4: missing key 'labels'"):
        load_dataset(spec("cifar10", root), seed=1)
    write_pickle(target, {"data": np.zeros((2, 3072), dtype=np.uint8), "labels": [0, 10]})
    with pytest.raises(DatasetError, match=r"data_batch_4: labels out of range 0..10 for 10 classes"):
        load_dataset(spec("cifar10", root), seed=1)
    write_pickle(target, {"data": np.zeros((2, 3072), dtype=np.uint8), "labels": [0]})
    with pytest.raises(DatasetError, match=r"data_batch_4: 'labels' must be 2 integers"):
        load_dataset(spec("cifar10", root), seed=1)
    write_pickle(target, [1, 2, 3])
    with pytest.raises(DatasetError, match=r"data_batch_4: expected a pickled dict, found list"):
        load_dataset(spec("cifar10", root), seed=1)


# --------------------------------------------------------------------------------------------------
# image folders


def save_image(path: Path, array: np.ndarray, fmt: str, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode == "P":
        # A palette image with a transparent (unused) entry: Pillow warns when such an image is
        # converted straight to RGB, and warnings are errors here.
        img.quantize(colors=4).save(path, format=fmt, transparency=3)
        return
    if mode is not None:
        img = img.convert(mode)
    img.save(path, format=fmt)


def solid(rgb: tuple[int, int, int], h: int = 10, w: int = 12) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (h, w, 3)).copy()


def test_imagefolder_with_test_folder(tmp_path: Path) -> None:
    red, blue, grey = (250, 0, 0), (0, 0, 250), (90, 90, 90)
    save_image(tmp_path / "train" / "cat" / "a.png", solid(red), "PNG")
    save_image(tmp_path / "train" / "cat" / "b.PNG", solid(red, 20, 7), "PNG")
    save_image(tmp_path / "train" / "cat" / "c.png", solid(grey), "PNG", mode="L")  # grey -> RGB
    save_image(tmp_path / "train" / "dog" / "a.jpg", solid(blue, 40, 40), "JPEG")
    save_image(tmp_path / "train" / "dog" / "b.png", solid(blue), "PNG", mode="P")  # palette + tRNS -> RGB
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image, ignored by extension")
    (tmp_path / "train" / "dog" / "._a.jpg").write_bytes(b"macOS metadata, ignored as a hidden file")
    save_image(tmp_path / "test" / "dog" / "x.png", solid(blue), "PNG")
    save_image(tmp_path / "test" / "cat" / "y.bmp", solid(red), "BMP")
    ds = load_dataset(spec("imagefolder", tmp_path, image_size=8), seed=1)
    assert ds.classes == ("cat", "dog") and ds.num_classes == 2
    assert ds.x_train.shape == (5, 3, 8, 8) and ds.x_test.shape == (2, 3, 8, 8)
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1] and ds.y_test.tolist() == [0, 1]
    pixels = ds.x_train[:, :, 4, 4].tolist()  # centre pixel of each image, as RGB
    assert pixels[0] == list(red) and pixels[1] == list(red) and pixels[2] == list(grey)
    assert max(abs(a - b) for a, b in zip(pixels[3], blue, strict=True)) <= 6  # JPEG is lossy
    assert pixels[4] == list(blue)
    mean, std = numpy_channel_stats(ds.x_train.numpy())
    assert ds.mean == pytest.approx(tuple(mean), abs=1e-9) and ds.std == pytest.approx(tuple(std), abs=1e-9)


def test_imagefolder_without_test_folder_holds_out_20_percent(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("a", "b", "c"):
        for i in range(10):
            save_image(tmp_path / "train" / cls / f"{i}.png", rng.integers(0, 256, (9, 9, 3), dtype=np.uint8), "PNG")
    first = load_dataset(spec("imagefolder", tmp_path, image_size=8), seed=1)
    second = load_dataset(spec("imagefolder", tmp_path, image_size=8), seed=99)
    assert first.x_train.shape == (24, 3, 8, 8) and first.x_test.shape == (6, 3, 8, 8)
    assert torch.bincount(first.y_test).tolist() == [2, 2, 2]
    assert torch.equal(first.x_test, second.x_test) and torch.equal(first.y_test, second.y_test)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_dataset(spec("imagefolder", tmp_path / "missing"), seed=1)
    with pytest.raises(DatasetError, match=r"train: missing folder"):
        load_dataset(spec("imagefolder", tmp_path), seed=1)
    save_image(tmp_path / "train" / "a" / "0.png", solid((1, 2, 3)), "PNG")
    save_image(tmp_path / "train" / "a" / "1.png", solid((1, 2, 3)), "PNG")
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(DatasetError, match=r"train/b: empty class folder"):
        load_dataset(spec("imagefolder", tmp_path), seed=1)
    (tmp_path / "train" / "b" / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DatasetError, match=r"broken\.png: unreadable image"):
        load_dataset(spec("imagefolder", tmp_path), seed=1)
    good = io.BytesIO()
    Image.fromarray(solid((5, 5, 5), 30, 30)).save(good, format="JPEG")
    (tmp_path / "train" / "b" / "broken.png").write_bytes(good.getvalue()[:200])  # truncated JPEG
    with pytest.raises(DatasetError, match=r"broken\.png: unreadable image"):
        load_dataset(spec("imagefolder", tmp_path), seed=1)


def test_imagefolder_decompression_bomb_is_a_dataset_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for cls in ("a", "b"):
        for i in range(2):
            save_image(tmp_path / "train" / cls / f"{i}.png", solid((1, 2, 3)), "PNG")
    # Pillow refuses images past twice MAX_IMAGE_PIXELS; a tiny limit makes these count as bombs.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4)
    with pytest.raises(DatasetError, match=r"0\.png: unreadable image \(DecompressionBombError"):
        load_dataset(spec("imagefolder", tmp_path), seed=1)


def test_checking_reads_what_the_loader_reads(tmp_path: Path) -> None:
    """check_dataset (validating an upload) gives the loader's counts and classes, and the loader's
    error for the same first bad image in folder order."""
    rng = np.random.default_rng(0)
    with_test, held_out = tmp_path / "with_test", tmp_path / "held_out"
    for cls in ("a", "b", "c"):
        for i in range(5):
            pixels = rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)
            save_image(held_out / "train" / cls / f"{i}.png", pixels, "PNG")
            save_image(with_test / ("test" if i == 4 else "train") / cls / f"{i}.png", pixels, "PNG")
    for root in (with_test, held_out):
        folder = spec("imagefolder", root, image_size=12)
        assert check_dataset(folder) == DatasetSummary.of(load_dataset(folder, seed=0))
    assert check_dataset(held_out_spec := spec("imagefolder", held_out)) == DatasetSummary(
        train_samples=12, test_samples=3, num_classes=3, classes=("a", "b", "c"), input_shape=(3, 32, 32))
    assert check_dataset(spec("synthetic")) == DatasetSummary.of(load_dataset(spec("synthetic"), seed=0))

    (held_out / "train" / "b" / "3.png").write_bytes(b"not an image")
    (held_out / "train" / "b" / "1.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DatasetError, match=r"b/1\.png: unreadable image") as loading:
        load_dataset(held_out_spec, seed=0)
    with pytest.raises(DatasetError, match=r"b/1\.png: unreadable image") as checking:
        check_dataset(held_out_spec)
    assert str(checking.value) == str(loading.value)
    for image in (held_out / "train" / "b").iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match="train/b: empty class folder"):
        check_dataset(held_out_spec)


def test_checking_an_image_folder_holds_one_image_at_a_time(tmp_path: Path) -> None:
    """Decoded, the folder is 120 images x 3 x 128 x 128 = 5.9 MB; checking it allocates less than
    a tenth of that at its peak, where loading it allocates all of it (tracemalloc counts numpy's
    buffers, where decoded images live; Pillow's own per-image buffers are bounded by its pixel
    limit)."""
    rng = np.random.default_rng(0)
    for i in range(120):
        save_image(tmp_path / "train" / f"c{i % 3}" / f"{i:03d}.png", rng.integers(0, 256, (8, 8, 3), np.uint8), "PNG")
    folder = spec("imagefolder", tmp_path, image_size=128)
    decoded = 120 * 3 * 128 * 128

    def peak(fn: Any) -> int:
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    checked = peak(lambda: check_dataset(folder))
    loaded = peak(lambda: load_dataset(folder, seed=0))
    assert loaded >= decoded, "the measurement does not see the decoded images"
    assert checked < decoded / 10, (checked, decoded)


# --------------------------------------------------------------------------------------------------
# npz


def test_npz_channel_last_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, size=(12, 5, 6, 3), dtype=np.uint8)  # NHWC
    x_test = rng.integers(0, 256, size=(4, 5, 6, 3), dtype=np.uint8)
    y_train, y_test = np.arange(12) % 3, np.array([0, 1, 2, 4])
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    ds = load_dataset(spec("npz", path), seed=1)
    assert ds.is_image and ds.input_shape == (3, 5, 6) and ds.num_classes == 5
    assert np.array_equal(ds.x_train.numpy(), x_train.transpose(0, 3, 1, 2))
    assert ds.y_train.dtype == torch.int64 and ds.y_test.tolist() == [0, 1, 2, 4]
    mean, std = numpy_channel_stats(x_train.transpose(0, 3, 1, 2))
    assert ds.mean == pytest.approx(tuple(mean), abs=1e-9) and ds.std == pytest.approx(tuple(std), abs=1e-9)


def test_npz_grey_and_float_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(6, 7, 7), dtype=np.uint8)
    path = tmp_path / "grey.npz"
    np.savez(path, x_train=grey, y_train=np.zeros(6, np.int32), x_test=grey[:2], y_test=np.ones(2, np.int32))
    ds = load_dataset(spec("npz", path), seed=1)
    assert ds.x_train.shape == (6, 1, 7, 7) and torch.equal(ds.x_train[:, 0], torch.from_numpy(grey))
    floats = rng.random(size=(4, 3, 4, 4))  # already NCHW, in [0, 1]
    path = tmp_path / "float.npz"
    names = np.array(list("wxyz"))
    np.savez(path, x_train=floats, y_train=np.arange(4), x_test=floats, y_test=np.arange(4), classes=names)
    ds = load_dataset(spec("npz", path), seed=1)
    assert ds.x_train.dtype == torch.uint8 and ds.classes == ("w", "x", "y", "z")
    assert np.array_equal(ds.x_train.numpy(), np.rint(floats * 255).astype(np.uint8))
    np.savez(path, x_train=floats * 2, y_train=np.arange(4), x_test=floats, y_test=np.arange(4))
    with pytest.raises(DatasetError, match=r"float\.npz: 'x_train' is a float image array with values outside"):
        load_dataset(spec("npz", path), seed=1)


def test_npz_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x_train = rng.normal(3.0, 2.0, size=(50, 4))
    x_train[:, 3] = 7.0  # a constant feature: std falls back to 1
    path = tmp_path / "tab.npz"
    np.savez(path, x_train=x_train, y_train=rng.integers(0, 3, 50), x_test=x_train[:10], y_test=np.arange(10) % 3)
    ds = load_dataset(spec("npz", path), seed=1)
    assert not ds.is_image and ds.x_train.dtype == torch.float32 and ds.input_shape == (4,)
    assert ds.mean == pytest.approx(tuple(x_train.astype(np.float32).mean(axis=0)), rel=1e-6)
    assert ds.std[:3] == pytest.approx(tuple(x_train[:, :3].astype(np.float32).std(axis=0)), rel=1e-5)
    assert ds.std[3] == 1.0 and ds.mean[3] == pytest.approx(7.0)


def test_npz_errors(tmp_path: Path) -> None:
    x, y = np.zeros((4, 8, 8), np.uint8), np.arange(4)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x)
    with pytest.raises(DatasetError, match=r"d\.npz: missing array 'y_test'"):
        load_dataset(spec("npz", path), seed=1)
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=np.array([{"a": 1}] * 4, dtype=object))
    with pytest.raises(DatasetError, match=r"d\.npz: array 'y_test' is an object array \(pickled data\); refused"):
        load_dataset(spec("npz", path), seed=1)
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=np.array([0, 1, -1, 2]))
    with pytest.raises(DatasetError, match=r"'y_test' has negative labels"):
        load_dataset(spec("npz", path), seed=1)
    np.savez(path, x_train=x, y_train=y.astype(np.float64), x_test=x, y_test=y)
    with pytest.raises(DatasetError, match=r"'y_train' has dtype float64; labels must be integers"):
        load_dataset(spec("npz", path), seed=1)
    np.savez(path, x_train=x, y_train=y[:3], x_test=x, y_test=y)
    with pytest.raises(DatasetError, match=r"'y_train' has shape \(3,\); expected \[4\]"):
        load_dataset(spec("npz", path), seed=1)
    np.savez(path, x_train=x, y_train=y, x_test=np.zeros((4, 9, 9), np.uint8), y_test=y)
    with pytest.raises(DatasetError, match=r"x_train samples .* and x_test samples .* differ"):
        load_dataset(spec("npz", path), seed=1)
    np.savez(path, x_train=np.zeros((4, 5, 6, 7), np.uint8), y_train=y, x_test=x, y_test=y)
    with pytest.raises(DatasetError, match=r"cannot tell the channel axis"):
        load_dataset(spec("npz", path), seed=1)
    good = tmp_path / "good.npz"
    np.savez(good, x_train=x, y_train=y, x_test=x, y_test=y)
    path.write_bytes(good.read_bytes()[:-40])  # cut into the zip directory
    with pytest.raises(DatasetError, match=r"d\.npz: not an npz archive"):
        load_dataset(spec("npz", path), seed=1)
    path.write_bytes(b"plain text")
    with pytest.raises(DatasetError, match=r"d\.npz: not an npz archive"):
        load_dataset(spec("npz", path), seed=1)
    pickled = tmp_path / "p.npz"
    with pickled.open("wb") as fh:
        pickle.dump({"x_train": x}, fh)
    with pytest.raises(DatasetError, match=r"p\.npz: not an npz archive"):
        load_dataset(spec("npz", pickled), seed=1)
    single = tmp_path / "single.npy"
    np.save(single, x)
    with pytest.raises(DatasetError, match=r"single\.npy: a single \.npy array, not an npz archive"):
        load_dataset(spec("npz", single), seed=1)
    with pytest.raises(DatasetError, match=r"no such file or folder"):
        load_dataset(spec("npz", tmp_path / "absent.npz"), seed=1)


def test_npz_header_must_match_its_member(tmp_path: Path) -> None:
    """numpy allocates what an .npy header declares before reading the member: a header that
    declares more than the member holds is refused before any array is read."""
    x, y = np.zeros((4, 8, 8), np.uint8), np.arange(4)
    path = tmp_path / "lie.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**9,)})
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("classes.npy", header.getvalue() + bytes(8))
    with pytest.raises(DatasetError, match=r"lie\.npz: array 'classes' declares 8000000000 bytes of data but"):
        load_dataset(spec("npz", path), seed=1)


# --------------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_is_seeded_and_balanced() -> None:
    a = load_dataset(spec("synthetic", synthetic_samples=200), seed=5)
    b = load_dataset(spec("synthetic", synthetic_samples=200), seed=5)
    c = load_dataset(spec("synthetic", synthetic_samples=200), seed=6)
    assert a.x_train.shape == (200, 3, 8, 8) and a.x_test.shape == (50, 3, 8, 8) and a.num_classes == 10
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert torch.bincount(a.y_train).tolist() == [20] * 10


def test_synthetic_is_learnable_by_a_small_cnn() -> None:
    ds = load_dataset(spec("synthetic", synthetic_samples=2000), seed=1)
    torch.manual_seed(0)
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)

    def prep(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - mean) / std

    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, ds.num_classes),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        net.train()
        for batch in torch.randperm(2000).split(64):
            loss = nn.functional.cross_entropy(net(prep(ds.x_train[batch])), ds.y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(prep(ds.x_test)).argmax(1) == ds.y_test).float().mean())
    assert accuracy > 0.5  # chance is 0.1


# --------------------------------------------------------------------------------------------------
# the Dataset type itself


def test_dataset_validates_and_fills_class_names() -> None:
    x = torch.zeros(4, 2, dtype=torch.float32)
    y = torch.tensor([0, 1, 2, 1])
    ds = Dataset.from_tensors("t", x, y, x, y)
    assert ds.num_classes == 3 and ds.classes == ("0", "1", "2") and not ds.is_image
    assert ds.mean == (0.0, 0.0) and ds.std == (1.0, 1.0)
    with pytest.raises(DatasetError, match="test labels out of range"):
        Dataset.from_tensors("t", x, y, x, torch.tensor([0, 1, 2, 5]), num_classes=3)
    with pytest.raises(DatasetError, match="features must be float32"):
        Dataset.from_tensors("t", x.double(), y, x.double(), y)
    with pytest.raises(DatasetError, match="2 class names for 3 classes"):
        Dataset.from_tensors("t", x, y, x, y, num_classes=3, classes=["a", "b"])


def test_channel_stats_chunks_agree_with_one_pass() -> None:
    x = torch.randint(0, 256, (37, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    small, large = channel_stats(x, chunk=5), channel_stats(x, chunk=1000)
    assert small[0] == pytest.approx(large[0], abs=1e-12) and small[1] == pytest.approx(large[1], abs=1e-12)
    mean, std = numpy_channel_stats(x.numpy())
    got_mean, got_std = channel_stats(x, chunk=5)
    assert got_mean == pytest.approx(tuple(mean), abs=1e-12) and got_std == pytest.approx(tuple(std), abs=1e-12)


def test_dataset_errors_are_run_input_errors(tmp_path: Path) -> None:
    from app_engine.errors import RunInputError

    with pytest.raises(RunInputError, match="no such file"):
        load_dataset(spec("npz", tmp_path / "missing.npz"), seed=0)
