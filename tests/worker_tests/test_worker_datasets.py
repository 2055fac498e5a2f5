"""worker/datasets.py: validating an upload without Celery, against a real Redis, the local storage
backend and the engine's real loaders."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from dataset_support import digits_npz, uploaded
from PIL import Image

from app_common.settings import Settings
from app_common.storage import LocalStorage, dataset_key
from app_common.store import JobStore
from worker.datasets import OUTCOME_SKIPPED, validate_dataset


@pytest.fixture
def local(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(update={"cache_dir": tmp_path / "cache", "storage_dir": tmp_path / "storage"})


@pytest.fixture
def storage(local: Settings) -> LocalStorage:
    return LocalStorage(local.storage_dir)


def test_a_good_npz_becomes_ready_with_what_the_loader_found(
    store: JobStore, storage: LocalStorage, local: Settings, tmp_path: Path
) -> None:
    record = uploaded(store, storage, digits_npz(tmp_path / "digits.npz"))
    assert validate_dataset(record.id, store=store, storage=storage, settings=local) == "ready"
    ready = store.get_dataset(record.id)
    assert ready is not None and ready.status == "ready" and ready.error is None and ready.info is not None
    assert ready.info.model_dump() == {
        "train_samples": 300, "test_samples": 100, "num_classes": 10,
        "classes": [str(d) for d in range(10)], "input_shape": [1, 8, 8],
    }
    assert list((local.cache_dir / ".tmp").iterdir()) == []  # the work folder is gone
    # A redelivered message finds it ready: nothing to do.
    assert validate_dataset(record.id, store=store, storage=storage, settings=local) == OUTCOME_SKIPPED


def test_a_wrong_sha256_makes_it_invalid(store: JobStore, storage: LocalStorage, local: Settings,
                                         tmp_path: Path) -> None:
    record = uploaded(store, storage, digits_npz(tmp_path / "digits.npz"), sha256="0" * 64)
    assert validate_dataset(record.id, store=store, storage=storage, settings=local) == "invalid"
    invalid = store.get_dataset(record.id)
    assert invalid is not None and invalid.info is None
    assert invalid.error is not None and invalid.error.startswith("sha256 mismatch: the uploaded file's sha256 is ")
    assert invalid.error.endswith(f"not the declared {'0' * 64}")


def test_the_loaders_reason_without_paths_of_this_host(store: JobStore, storage: LocalStorage, local: Settings,
                                                       tmp_path: Path) -> None:
    path = tmp_path / "partial.npz"
    with path.open("wb") as fh:
        np.savez(fh, x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.arange(4), x_test=np.zeros((2, 8, 8)))
    record = uploaded(store, storage, path)
    assert validate_dataset(record.id, store=store, storage=storage, settings=local) == "invalid"
    invalid = store.get_dataset(record.id)
    assert invalid is not None and invalid.error is not None
    assert invalid.error.startswith("dataset.npz: missing array 'y_test'")
    assert str(tmp_path) not in invalid.error and "\n" not in invalid.error


def test_archives_are_unpacked_with_the_limits(store: JobStore, storage: LocalStorage, local: Settings,
                                               tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/cat/zeros.png", bytes(2 * 2**20))
        zf.writestr("train/cat/zeros2.png", bytes(2**10))  # two per class: the loader can split, then decodes
    record = uploaded(store, storage, bomb, fmt="imagefolder")
    limited = local.model_copy(update={"max_dataset_extracted_bytes": 2**20})
    assert validate_dataset(record.id, store=store, storage=storage, settings=limited) == "invalid"
    invalid = store.get_dataset(record.id)
    assert invalid is not None and invalid.error == "the archive unpacks to more than 1048576 bytes"
    # Within the limits the same archive reaches the loader, whose reason names the first bad member.
    again = uploaded(store, storage, bomb, fmt="imagefolder")
    assert validate_dataset(again.id, store=store, storage=storage, settings=local) == "invalid"
    reason = store.get_dataset(again.id).error  # type: ignore[union-attr]
    assert reason is not None and reason.startswith("train/cat/zeros.png: unreadable image"), reason


def test_deleted_or_missing_uploads(store: JobStore, storage: LocalStorage, local: Settings, tmp_path: Path) -> None:
    record = uploaded(store, storage, digits_npz(tmp_path / "digits.npz"))
    storage.delete(dataset_key(record.id))
    assert validate_dataset(record.id, store=store, storage=storage, settings=local) == "invalid"
    assert store.get_dataset(record.id).error == "the uploaded file is missing from the object store"  # type: ignore[union-attr]
    gone = uploaded(store, storage, digits_npz(tmp_path / "digits.npz"))
    assert store.delete_dataset(gone.id)
    assert validate_dataset(gone.id, store=store, storage=storage, settings=local) == OUTCOME_SKIPPED
    assert validate_dataset("f" * 32, store=store, storage=storage, settings=local) == OUTCOME_SKIPPED


def test_an_image_folder_is_checked_image_by_image(store: JobStore, storage: LocalStorage, local: Settings,
                                                  tmp_path: Path) -> None:
    """A folder of good images is ready with the loader's counts (the images are checked one at a
    time, never decoded into one array); one with unreadable members is invalid, naming the first
    in folder order as the archive holds it."""
    rng = np.random.default_rng(0)
    good = tmp_path / "pets.zip"
    with zipfile.ZipFile(good, "w") as zf:
        for cls in ("cat", "dog"):
            for i in range(5):
                image = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (6, 6, 3), np.uint8)).save(image, format="PNG")
                zf.writestr(f"pets/train/{cls}/{i}.png", image.getvalue())
    record = uploaded(store, storage, good, fmt="imagefolder")
    assert validate_dataset(record.id, store=store, storage=storage, settings=local) == "ready"
    info = store.get_dataset(record.id).info  # type: ignore[union-attr]
    assert info is not None and info.model_dump() == {
        "train_samples": 8, "test_samples": 2, "num_classes": 2, "classes": ["cat", "dog"],
        "input_shape": [3, 32, 32],
    }
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(bad, "w") as zf:
        for member in source.namelist():
            broken = member in ("pets/train/dog/1.png", "pets/train/dog/3.png")
            zf.writestr(member, b"not an image" if broken else source.read(member))
    record = uploaded(store, storage, bad, fmt="imagefolder")
    assert validate_dataset(record.id, store=store, storage=storage, settings=local) == "invalid"
    reason = store.get_dataset(record.id).error  # type: ignore[union-attr]
    assert reason is not None and reason.startswith("pets/train/dog/1.png: unreadable image"), reason
