"""app_engine/data/archive.py: uploads in the real formats unpack into what the loaders read; hostile,
damaged or mislabelled archives are refused with the problem named, and leave nothing behind."""

from __future__ import annotations

import io
import pickle
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app_common.spec import DatasetSpec
from app_engine.data import DatasetError, load_dataset
from app_engine.data.archive import archive_kind, unpack_dataset

LIMITS = {"max_bytes": 1 << 20, "max_members": 100}


def cifar10_folder(root: Path, per_batch: int = 2) -> Path:
    """``root/cifar-10-batches-py`` in the python-version format the loader reads (tiny batches)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return folder


def image_folder(root: Path) -> Path:
    for split, count in (("train", 3), ("test", 1)):
        for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (10, 12), colour).save(folder / f"{i}.png")
    return root


def zip_tree(folder: Path, out: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, prefix + path.relative_to(folder).as_posix())
    return out


def tar_tree(folder: Path, out: Path, mode: str = "w:gz") -> Path:
    with tarfile.open(out, mode) as tf:
        tf.add(folder, arcname=".")
    return out


def npz_file(path: Path, **arrays: np.ndarray) -> Path:
    x = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
    defaults = {"x_train": x, "y_train": np.arange(4) % 2, "x_test": x[:2], "y_test": np.array([0, 1])}
    with path.open("wb") as fh:  # a handle: numpy would add ".npz" to a name without it
        np.savez_compressed(fh, **(defaults | arrays))  # type: ignore[arg-type]
    return path


def tar_with(out: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def tar_info(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def refused(fmt: str, source: Path, out: Path, match: str, **limits: int) -> None:
    """Unpacking fails with ``match`` and leaves the output folder as empty as it was."""
    with pytest.raises(DatasetError, match=match):
        unpack_dataset(fmt, source, out / "ds", **(LIMITS | limits))  # type: ignore[arg-type]
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# good uploads


@pytest.mark.parametrize("packer", ["tar.gz", "zip", "tar"])
def test_cifar10_archives_unpack_into_the_loader_layout(tmp_path: Path, out: Path, packer: str) -> None:
    cifar10_folder(tmp_path / "src")
    if packer == "zip":  # the files wrapped in one more folder, as people zip things
        source = zip_tree(tmp_path / "src", tmp_path / "upload", prefix="my data/")
    else:
        source = tar_tree(tmp_path / "src", tmp_path / "upload", "w:gz" if packer == "tar.gz" else "w")
    assert archive_kind(source) == ("zip" if packer == "zip" else "tar")
    path = unpack_dataset("cifar10", source, out / "ds", **LIMITS)
    assert path.is_relative_to(out / "ds") and (out / "ds").is_dir()
    ds = load_dataset(DatasetSpec(name="cifar10", path=str(path)), seed=0)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    assert ds.classes == tuple(f"c{i}" for i in range(10))
    assert [p.name for p in out.iterdir()] == ["ds"]  # no temporary folder left beside it


def test_imagefolder_zip_of_pngs(tmp_path: Path, out: Path) -> None:
    source = zip_tree(image_folder(tmp_path / "src"), tmp_path / "images.zip")
    path = unpack_dataset("imagefolder", source, out / "ds", **LIMITS)
    assert path == out / "ds"
    ds = load_dataset(DatasetSpec(name="imagefolder", path=str(path), image_size=8), seed=0)
    assert ds.classes == ("cat", "dog") and ds.x_train.shape == (6, 3, 8, 8) and ds.x_test.shape == (2, 3, 8, 8)
    assert ds.x_train[ds.y_train == 0][:, 0].min() == 255  # cats are red


def test_npz_is_checked_and_copied(tmp_path: Path, out: Path) -> None:
    source = npz_file(tmp_path / "upload")
    path = unpack_dataset("npz", source, out / "ds", **LIMITS)
    assert path == out / "ds" / "dataset.npz" and path.read_bytes() == source.read_bytes()
    ds = load_dataset(DatasetSpec(name="npz", path=str(path)), seed=0)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 2


def test_dest_must_be_new(tmp_path: Path, out: Path) -> None:
    (out / "ds").mkdir()
    with pytest.raises(FileExistsError):
        unpack_dataset("npz", npz_file(tmp_path / "u"), out / "ds", **LIMITS)


# --------------------------------------------------------------------------------------------------
# members that escape, links and special files


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/abs/evil", "..\\evil", "C:/evil"])
def test_zip_members_escaping_the_folder_are_refused(tmp_path: Path, out: Path, name: str) -> None:
    source = tmp_path / "up.zip"
    with zipfile.ZipFile(source, "w") as zf:
        zf.writestr("train/a/ok.png", b"x")
        zf.writestr(zipfile.ZipInfo(name), b"evil")
    refused("imagefolder", source, out, "escapes the archive's folder")
    assert not (tmp_path / "evil").exists() and not Path("/abs/evil").exists()


@pytest.mark.parametrize("name", ["../evil", "/abs/evil"])
def test_tar_members_escaping_the_folder_are_refused(tmp_path: Path, out: Path, name: str) -> None:
    source = tar_with(tmp_path / "up.tgz", (tar_info(name), b"evil"))
    refused("cifar10", source, out, "escapes the archive's folder")


def test_links_are_refused(tmp_path: Path, out: Path) -> None:
    sym = tar_with(tmp_path / "sym.tgz", (tar_info("train/link", tarfile.SYMTYPE, linkname="/etc/passwd"), None))
    refused("imagefolder", sym, out, "'train/link' is a symbolic link; links are refused")
    hard = tar_with(tmp_path / "hard.tgz", (tar_info("train/a", tarfile.REGTYPE), b"x"),
                    (tar_info("train/b", tarfile.LNKTYPE, linkname="train/a"), None))
    refused("imagefolder", hard, out, "'train/b' is a hard link")
    zipped = tmp_path / "sym.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        info = zipfile.ZipInfo("train/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    refused("imagefolder", zipped, out, "'train/link' is a symbolic link")


@pytest.mark.parametrize("kind", [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE])
def test_devices_and_fifos_are_refused(tmp_path: Path, out: Path, kind: bytes) -> None:
    source = tar_with(tmp_path / "dev.tgz", (tar_info("train/dev", kind), None))
    refused("imagefolder", source, out, "'train/dev' is a device or FIFO")


def test_a_member_twice_or_a_file_where_a_folder_goes_is_refused(tmp_path: Path, out: Path) -> None:
    twice = tar_with(tmp_path / "twice.tgz", (tar_info("train/a"), b"1"), (tar_info("train/a"), b"2"))
    refused("imagefolder", twice, out, "'train/a' conflicts with another member")
    clash = tar_with(tmp_path / "clash.tgz", (tar_info("train"), b"1"), (tar_info("train/a"), b"2"))
    refused("imagefolder", clash, out, "'train/a' conflicts")


# --------------------------------------------------------------------------------------------------
# bombs and limits


def test_zip_bomb_stops_at_the_byte_limit(tmp_path: Path, out: Path) -> None:
    source = tmp_path / "bomb.zip"
    with zipfile.ZipFile(source, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/zeros", bytes(10 * 2**20))
    assert source.stat().st_size < 64 * 1024
    refused("imagefolder", source, out, "unpacks to more than 1048576 bytes")


def test_tar_gz_bomb_stops_at_the_byte_limit(tmp_path: Path, out: Path) -> None:
    source = tar_with(tmp_path / "bomb.tgz", (tar_info("train/zeros"), bytes(10 * 2**20)))
    assert source.stat().st_size < 64 * 1024
    refused("cifar10", source, out, "unpacks to more than 1048576 bytes")


def test_too_many_members(tmp_path: Path, out: Path) -> None:
    source = tmp_path / "many.zip"
    with zipfile.ZipFile(source, "w") as zf:
        for i in range(5):
            zf.writestr(f"train/c/{i}.png", b"x")
    refused("imagefolder", source, out, "more than 3 members", max_members=3)
    tarred = tar_with(tmp_path / "many.tgz", *((tar_info(f"f{i}"), b"x") for i in range(5)))
    refused("imagefolder", tarred, out, "more than 3 members", max_members=3)


def test_npz_past_the_limits_is_refused(tmp_path: Path, out: Path) -> None:
    big = npz_file(tmp_path / "big", x_train=np.zeros((4, 512, 512), np.uint8))  # 1 MiB of zeros
    assert big.stat().st_size < 64 * 1024
    refused("npz", big, out, "the npz unpacks to .* bytes, more than the 1048576 allowed")
    refused("npz", npz_file(tmp_path / "many"), out, "4 members in the npz, more than the 3 allowed", max_members=3)


def test_npz_with_an_object_array_is_refused(tmp_path: Path, out: Path) -> None:
    source = npz_file(tmp_path / "obj", y_test=np.array([{"a": 1}, None], dtype=object))
    refused("npz", source, out, r"array 'y_test' is an object array \(pickled data\); refused")


def test_npz_header_declaring_more_than_the_member_holds_is_refused(tmp_path: Path, out: Path) -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (10**6, 1000)})
    source = npz_file(tmp_path / "lie")
    with zipfile.ZipFile(source, "a") as zf:
        zf.writestr("huge.npy", header.getvalue() + bytes(16))
    refused("npz", source, out, "array 'huge' declares 1000000000 bytes of data but its member holds 16")


# --------------------------------------------------------------------------------------------------
# damaged and mislabelled uploads


def test_truncated_archives(tmp_path: Path, out: Path) -> None:
    cifar10_folder(tmp_path / "src")
    for packer, name in ((tar_tree, "up.tgz"), (zip_tree, "up.zip")):
        whole = packer(tmp_path / "src", tmp_path / name)
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
        refused("cifar10", cut, out, "truncated or corrupt archive")


def test_corrupt_zip_member_fails_its_check(tmp_path: Path, out: Path) -> None:
    source = tmp_path / "up.zip"
    with zipfile.ZipFile(source, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("train/c/a.png", b"A" * 1000)
    data = bytearray(source.read_bytes())
    data[data.index(b"A" * 1000) + 500] = ord("B")  # a flipped byte: the CRC no longer matches
    source.write_bytes(bytes(data))
    refused("imagefolder", source, out, r"truncated or corrupt archive: member 'train/c/a.png' \(BadZipFile")


def test_garbage_and_wrong_kinds(tmp_path: Path, out: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\x01not an archive at all" * 50)
    refused("cifar10", garbage, out, "a cifar10 dataset is uploaded as a .zip or .tar.gz archive")
    refused("npz", garbage, out, "not an .npz file")
    cifar10_folder(tmp_path / "src")
    refused("npz", tar_tree(tmp_path / "src", tmp_path / "c.tgz"), out, "not an .npz file")
    refused("nonsense", garbage, out, "unknown dataset format 'nonsense'")


def test_a_format_that_does_not_match_the_content(tmp_path: Path, out: Path) -> None:
    images = zip_tree(image_folder(tmp_path / "images"), tmp_path / "images.zip")
    refused("cifar10", images, out, "the archive holds no cifar10 dataset: expected the folder cifar-10-batches-py/")
    cifar10_folder(tmp_path / "src")
    cifar = tar_tree(tmp_path / "src", tmp_path / "c.tgz")
    refused("cifar100", cifar, out, "the archive holds no cifar100 dataset")
    refused("imagefolder", cifar, out, "the archive holds no imagefolder dataset: expected a train/ folder")
    zipped_npz = npz_file(tmp_path / "d")
    refused("imagefolder", zipped_npz, out, "holds no imagefolder dataset")
