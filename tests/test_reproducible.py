"""Two identical runs write byte-identical files, so the manifest's checksums prove that a run was
reproduced (issue 11, item 7). Timings are measured, not reproduced: they live in result.json, not
in a hashed file."""

from __future__ import annotations

import json
from pathlib import Path

from app_common.spec import JobSpec
from app_engine.runner import run

SPEC = JobSpec.from_dict(
    {
        "dataset": {"name": "digits"},
        "architecture": "mlp",
        "method": "app",
        "sparsity": {"target": 0.5},
        "stream": {"megabatches": 2},
        "training": {"epochs": 1, "precision": "fp32", "device": "cpu", "seed": 5},
    }
)
TIMINGS = {"wall_time_s", "train_time_s", "images_per_s"}


def test_identical_runs_write_identical_files(tmp_path: Path) -> None:
    first = run(SPEC, tmp_path / "a")
    second = run(SPEC, tmp_path / "b")
    assert set(first.artifacts) == set(second.artifacts) >= {"model.safetensors", "model.sparse.safetensors",
                                                                "masks.safetensors", "manifest.json"}
    for name in first.artifacts:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        assert first.artifacts[name]["sha256"] == second.artifacts[name]["sha256"], name


def test_the_manifest_holds_no_timings_and_result_json_does(tmp_path: Path) -> None:
    run(SPEC, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    text = json.dumps(manifest)
    assert "created_at" not in manifest
    assert not any(key in text for key in TIMINGS), "timings in a hashed file"
    result = json.loads((tmp_path / "a" / "result.json").read_text())
    assert all(TIMINGS <= set(m) for m in result["megabatches"])
    assert result["wall_time_s"] > 0
