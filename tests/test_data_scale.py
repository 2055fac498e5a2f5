"""Image folders larger than the memory cap: decoded once into a memory-mapped file in the cache
folder, reused while the folder is unchanged, and trained on batch by batch with the same results
as the in-memory path."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from anytime_prune.cli import main
from app_common.spec import DatasetSpec, JobSpec
from app_engine.data import DataOptions, DatasetError, imagefolder, load_dataset
from app_engine.data.disk_cache import DECODED, ENV_CACHE_DIR, ENV_MEMORY_CAP, DataOptionError, remove_if_unused
from app_engine.runner import run

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
PER_CLASS = 12


def make_folder(root: Path, per_class: int = PER_CLASS) -> Path:
    """Noisy solid-colour images, PNG and JPEG mixed, one class per colour (learnable at 8x8)."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-40, 41, (12, 12, 3))
            pixels = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
            fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
            Image.fromarray(pixels).save(folder / f"{i:03d}.{ext}", format=fmt)
    return root


def decoded_files(cache: Path) -> list[Path]:
    return sorted((cache / DECODED).glob("*")) if (cache / DECODED).exists() else []


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    decoded: list[Path] = []
    real = imagefolder._read_image

    def counting(path: Path, size: int) -> np.ndarray:
        decoded.append(path)
        return real(path, size)

    monkeypatch.setattr(imagefolder, "_read_image", counting)
    return decoded


def test_a_set_over_the_cap_is_mapped_from_the_cache_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    spec = DatasetSpec(name="imagefolder", path=str(data), image_size=8)
    # 36 images of 3x8x8 bytes: far below the default cap of 4 GiB.
    in_memory = load_dataset(spec, seed=0, options=DataOptions(cache_dir=cache))
    assert not in_memory.streamed and decoded_files(cache) == []
    small = DataOptions(memory_cap_bytes=1000, cache_dir=cache)
    # Over the cap without a cache folder: loaded into memory all the same.
    assert not load_dataset(spec, seed=0, options=DataOptions(memory_cap_bytes=1000)).streamed

    decodes = count_decodes(monkeypatch)
    first = load_dataset(spec, seed=0, options=small)
    assert first.streamed and len(decodes) == 3 * PER_CLASS
    (cached,) = decoded_files(cache)
    assert cached.suffix == ".npy"
    for split in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(first, split), getattr(in_memory, split)), split
    assert first.mean == in_memory.mean and first.std == in_memory.std and first.classes == in_memory.classes

    inode = cached.stat().st_ino
    long_ago = time.time() - 3600
    os.utime(cached, (long_ago, long_ago))
    second = load_dataset(spec, seed=0, options=small)
    assert len(decodes) == 3 * PER_CLASS, "the second load decoded images again"
    assert decoded_files(cache) == [cached] and cached.stat().st_ino == inode
    assert cached.stat().st_mtime > long_ago + 1800  # a use is the LRU order of the worker's cache
    # Mapped by a live dataset: no evictor may remove it; once every dataset over it is gone, one may.
    assert not remove_if_unused(cached) and cached.exists()
    assert torch.equal(second.x_train, in_memory.x_train) and torch.equal(second.x_test, in_memory.x_test)

    # A changed folder is decoded again, and the file of its old content goes.
    Image.fromarray(np.full((12, 12, 3), 200, np.uint8)).save(data / "train" / "red" / "new.png")
    third = load_dataset(spec, seed=0, options=small)
    assert len(decodes) == 2 * 3 * PER_CLASS + 1
    (renewed,) = decoded_files(cache)
    assert renewed != cached and len(third.y_train) + len(third.y_test) == 3 * PER_CLASS + 1
    assert torch.equal(second.x_train, in_memory.x_train)  # its pages outlive the file's name
    del first, second, third
    assert remove_if_unused(renewed) and decoded_files(cache) == []


def test_an_unreadable_image_leaves_no_cache_file(tmp_path: Path) -> None:
    data, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    (data / "train" / "green" / "005.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DatasetError, match=r"005\.png: unreadable image"):
        load_dataset(DatasetSpec(name="imagefolder", path=str(data), image_size=8), seed=0,
                     options=DataOptions(memory_cap_bytes=0, cache_dir=cache))
    assert decoded_files(cache) == []  # neither a final nor a temporary file
    # What a loader killed mid-decode leaves is removed by the next decode once a day old.
    (data / "train" / "green" / "005.png").unlink()
    stale, fresh = cache / DECODED / ".x.npy.dead.tmp", cache / DECODED / ".y.npy.busy.tmp"
    for leftover in (stale, fresh):
        leftover.write_bytes(b"half a file")
    os.utime(stale, (time.time() - 2 * 24 * 3600,) * 2)
    load_dataset(DatasetSpec(name="imagefolder", path=str(data), image_size=8), seed=0,
                 options=DataOptions(memory_cap_bytes=0, cache_dir=cache))
    assert not stale.exists() and fresh.exists()


def test_options_from_the_environment() -> None:
    options = DataOptions.from_env({ENV_MEMORY_CAP: "123", ENV_CACHE_DIR: "/var/cache/app"})
    assert options == DataOptions(memory_cap_bytes=123, cache_dir=Path("/var/cache/app"))
    assert DataOptions.from_env({}, cache_dir="/w").cache_dir == Path("/w")
    assert DataOptions.from_env({}).cache_dir == Path("~/.cache/anytime-prune").expanduser()
    with pytest.raises(DataOptionError, match=f"{ENV_MEMORY_CAP}: '4GB' is not a whole number of bytes"):
        DataOptions.from_env({ENV_MEMORY_CAP: "4GB"})
    with pytest.raises(DataOptionError, match="is negative"):
        DataOptions(memory_cap_bytes=-1)


def job(data: Path, device: str = "cpu") -> JobSpec:
    return JobSpec.from_dict({
        "dataset": {"name": "imagefolder", "path": str(data), "image_size": 8},
        "architecture": "cnn_small",
        "method": "app",
        "sparsity": {"target": 0.5},
        "stream": {"megabatches": 2},
        "training": {"epochs": 2, "batch_size": 8, "device": device, "precision": "fp32"},
        "export": {"formats": ["safetensors"]},
    })


def comparable(result: dict[str, Any]) -> list[dict[str, Any]]:
    drop = {"wall_time_s", "train_time_s", "images_per_s"}
    return [{k: v for k, v in m.items() if k not in drop} for m in result["megabatches"]]


def run_both(tmp_path: Path, device: str) -> tuple[dict[str, Any], dict[str, Any], Path]:
    data, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    in_memory = run(job(data, device), tmp_path / "memory", data_options=DataOptions(cache_dir=cache)).result
    assert decoded_files(cache) == []
    small = DataOptions(memory_cap_bytes=1000, cache_dir=cache)
    from_disk = run(job(data, device), tmp_path / "disk", data_options=small).result
    return in_memory, from_disk, cache


def test_training_from_the_disk_cache_matches_training_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    in_memory, from_disk, cache = run_both(tmp_path, "cpu")
    assert comparable(from_disk) == comparable(in_memory)
    assert from_disk["final_test_accuracy"] == in_memory["final_test_accuracy"] > 0.5
    (cached,) = decoded_files(cache)
    # The command line takes the cap and the folder from the environment, and reuses the file.
    decodes = count_decodes(monkeypatch)
    monkeypatch.setenv(ENV_MEMORY_CAP, "1000")
    monkeypatch.setenv(ENV_CACHE_DIR, str(cache))
    code = main(["run", "--dataset", "imagefolder", "--data-path", str(tmp_path / "data"), "--image-size", "8",
                 "--arch", "cnn_small", "--method", "app", "--target-sparsity", "0.5", "--megabatches", "2",
                 "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--precision", "fp32",
                 "--export", "safetensors", "--out", str(tmp_path / "cli")])
    assert code == 0 and "result.json" in capsys.readouterr().out
    assert decodes == [] and decoded_files(cache) == [cached]
    again = json.loads((tmp_path / "cli" / "result.json").read_text())
    assert comparable(again) == comparable(in_memory)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_streamed_batches_train_on_cuda_as_device_resident_data_does(tmp_path: Path) -> None:
    """The streamed path's device moves (batches, validation, test, scoring) all work on CUDA.
    GPU kernels may sum in a different order from run to run, so the numbers need only be close."""
    in_memory, from_disk, _ = run_both(tmp_path, "cuda")
    assert from_disk["device"].startswith("cuda") and from_disk["status"] == "completed"
    for disk, memory in zip(from_disk["megabatches"], in_memory["megabatches"], strict=True):
        assert disk["density"] == memory["density"]
        assert disk["test_accuracy"] == pytest.approx(memory["test_accuracy"], abs=0.3)


def test_a_worker_decodes_a_large_data_folder_set_into_its_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker loads a dataset.path job's data itself, with its cache folder and the cap from
    the environment (an uploaded dataset goes the same way, from its cache entry)."""
    from app_common.settings import Settings
    from worker.dataset_cache import load_path_data

    make_folder(tmp_path / "data" / "pics")
    settings = Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    spec = JobSpec.from_dict({"dataset": {"name": "imagefolder", "path": "pics", "image_size": 8}})
    monkeypatch.setenv(ENV_MEMORY_CAP, "1000")
    data = load_path_data(spec, settings)
    assert data.streamed and len(decoded_files(tmp_path / "cache")) == 1
    monkeypatch.delenv(ENV_MEMORY_CAP)
    assert not load_path_data(spec, settings).streamed
