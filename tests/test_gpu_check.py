"""scripts/gpu-check.sh: its CPU dry run works end to end, so the one shot on a GPU machine does too.

The dry run is the same command with the same steps (the tests marked cuda, the training
benchmark, APP timed and extrapolated, one job through `serve` on the gpu queue) in tiny sizes on
the CPU. Here the dependencies are importable, so the script installs nothing. No timing is
asserted: only that every step ran, reported, and that nothing is judged against the GPU goals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_dry_run_runs_every_step_and_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--dry-run", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "nothing to install" in proc.stdout or "were importable" in proc.stdout
    assert "a dry run of every step in tiny sizes on the CPU" in proc.stdout

    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["ok"] is True
    assert report["environment"]["gpu"] is None and report["environment"]["torch"] == torch.__version__
    steps = report["steps"]
    assert list(steps) == ["cuda-tests", "bench", "app", "serve"]
    assert all(step["ok"] for step in steps.values()), steps

    tests = steps["cuda-tests"]
    assert "tests/test_cuda.py" in tests["files"] and tests["failures"] == tests["errors"] == 0
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"] > 0

    (arch, bench), = steps["bench"]["runs"].items()
    assert bench["ok"] and bench["images_per_s"]["engine"] > 0 and bench["images_per_s"]["conventional"] > 0
    assert bench["ratio"] == pytest.approx(bench["images_per_s"]["engine"] / bench["images_per_s"]["conventional"])

    app = steps["app"]
    assert app["device"] == "cpu" and app["megabatches"] == len(app["megabatch_seconds"]) == 2
    assert app["peak_gpu_memory_bytes"] is None
    # The extrapolation scales the training (not the fixed costs) by 50 / epochs.
    assert app["protocol_seconds"] > app["seconds"]
    assert app["protocol_train_images"] > 0 and app["protocol_train_images"] % 50 == 0

    serve = steps["serve"]
    assert serve["status"] == "succeeded" and serve["queue"] == "gpu" and serve["device"] == "cpu"
    assert "model.safetensors" in serve["files"] and serve["peak_gpu_memory_bytes"] == [None, None]

    # Goals are listed with their numbers but never judged on a dry run.
    assert [g["met"] for g in report["goals"]] == [None, None, None]
    # The table printed is the one in the report, one line per row.
    for _, text, _ in report["table"]:
        assert text in proc.stdout
    assert [r[0] for r in report["table"]][:5] == ["machine", "cuda-tests", f"bench {arch}", "app", "serve"]
