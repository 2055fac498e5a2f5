"""`anytime-prune build-restricted-imagenet`: a tiny ImageNet-style tree of real JPEG files under
real wnids becomes the 14-superclass image folder, which the imagefolder loader reads and the
ImageNet-stem ResNet trains on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anytime_prune.cli import main
from app_common.spec import DatasetSpec, JobSpec
from app_engine.data import load_dataset
from app_engine.data.restricted_imagenet import MANIFEST, SUPERCLASSES, build_restricted_imagenet
from app_engine.runner import run

TENCH = "n01440764"  # an ImageNet class in no superclass


def colour(superclass: str) -> tuple[int, int, int]:
    i = list(SUPERCLASSES).index(superclass)
    return (20 + 16 * i, 240 - 16 * i, 60 + 8 * i)


def jpeg(path: Path, rgb: tuple[int, int, int], size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), rgb, np.uint8)).save(path, format="JPEG", quality=95)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/<wnid>/ with 2 non-square JPEGs per member wnid, val/<wnid>/ with one, plus a non-member."""
    root = tmp_path_factory.mktemp("imagenet")
    for name, wnids in SUPERCLASSES.items():
        for wnid in wnids:
            for i in range(2):
                jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", colour(name), (90, 70))
            jpeg(root / "val" / wnid / f"ILSVRC2012_val_{wnid}.JPEG", colour(name), (70, 90))
    jpeg(root / "train" / TENCH / f"{TENCH}_0.JPEG", (0, 0, 0), (90, 70))
    return root


def test_the_superclasses_are_the_balanced_restricted_imagenet() -> None:
    assert len(SUPERCLASSES) == 14
    members = [w for wnids in SUPERCLASSES.values() for w in wnids]
    assert len(members) == len(set(members)) == 69
    assert "n02123045" in SUPERCLASSES["cat"] and "n01530575" in SUPERCLASSES["bird"]  # tabby, brambling
    assert "n13052670" in SUPERCLASSES["fungus"] and len(SUPERCLASSES["monkey"]) == 4  # hen-of-the-woods


def test_cli_builds_a_few_shot_folder_the_loader_reads(
    imagenet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "rin"
    code = main(["build-restricted-imagenet", str(imagenet), str(dest), "--per-class", "3", "--size", "16"])
    assert code == 0
    out = capsys.readouterr().out
    assert "train: 42 images" in out and "test: 69 images" in out
    assert sorted(p.name for p in (dest / "train").iterdir()) == sorted(SUPERCLASSES)
    for name in SUPERCLASSES:
        files = sorted((dest / "train" / name).iterdir())
        assert len(files) == 3 and all(f.suffix == ".png" and f.name[:9] in SUPERCLASSES[name] for f in files)
        assert len(list((dest / "test" / name).iterdir())) == len(SUPERCLASSES[name])
    assert not list(dest.rglob(f"{TENCH}*"))
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["per_class"] == 3 and manifest["counts"]["train"]["fungus"] == 3

    ds = load_dataset(DatasetSpec(name="imagefolder", path=str(dest), image_size=16), seed=0)
    assert ds.classes == tuple(sorted(SUPERCLASSES)) and ds.num_classes == 14
    assert ds.x_train.shape == (42, 3, 16, 16) and ds.x_test.shape == (69, 3, 16, 16)
    for x, y in zip(ds.x_train, ds.y_train, strict=True):  # each image carries its superclass's colour
        centre = x[:, 8, 8].tolist()
        assert max(abs(a - b) for a, b in zip(centre, colour(ds.classes[int(y)]), strict=True)) <= 8


def test_the_sample_is_seeded_and_without_size_files_are_copied(imagenet: Path, tmp_path: Path) -> None:
    def names(dest: Path) -> list[str]:
        return sorted(p.relative_to(dest).as_posix() for p in (dest / "train").rglob("*.*"))

    a = build_restricted_imagenet(imagenet, tmp_path / "a", per_class=4, size=16, seed=7)
    b = build_restricted_imagenet(imagenet, tmp_path / "b", per_class=4, size=16, seed=7)
    c = build_restricted_imagenet(imagenet, tmp_path / "c", per_class=4, size=16, seed=8)
    assert names(a.dest) == names(b.dest) != names(c.dest)
    full = build_restricted_imagenet(imagenet, tmp_path / "full", size=None)
    assert sum(full.counts["train"].values()) == 2 * 69
    copied = full.dest / "train" / "cat" / "n02123045_n02123045_0.JPEG"
    assert copied.read_bytes() == (imagenet / "train" / "n02123045" / "n02123045_0.JPEG").read_bytes()


def test_bad_sources_and_destinations_are_named(imagenet: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"missing folder"):
        main(["build-restricted-imagenet", str(tmp_path / "nothing"), str(tmp_path / "d")])
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit, match=r"taken: already exists"):
        main(["build-restricted-imagenet", str(imagenet), str(tmp_path / "taken")])
    partial = tmp_path / "partial"
    jpeg(partial / "train" / "n02123045" / "a.JPEG", (1, 2, 3), (20, 20))
    with pytest.raises(SystemExit, match=r"no images for superclass\(es\) bird, turtle.*n01530575"):
        main(["build-restricted-imagenet", str(partial), str(tmp_path / "d")])
    assert not (tmp_path / "d").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_imagenet_resnet_trains_on_the_built_folder(imagenet: Path, tmp_path: Path) -> None:
    dest = build_restricted_imagenet(imagenet, tmp_path / "rin", per_class=2, size=64).dest
    spec = JobSpec.from_dict({
        "dataset": {"name": "imagefolder", "path": str(dest), "image_size": 64},
        "architecture": "resnet18_imagenet",
        "method": "app",
        "sparsity": {"target": 0.5},
        "stream": {"megabatches": 2},
        "training": {"epochs": 1, "batch_size": 16, "device": "cpu", "precision": "fp32"},
        "export": {"formats": ["safetensors"]},
    })
    result = run(spec, tmp_path / "out").result
    assert result["status"] == "completed"
    assert result["final_density"] == pytest.approx(0.5, abs=0.002)
    assert result["megabatches"][-1]["test_total"] == 69
