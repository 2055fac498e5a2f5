"""The runner end to end on real data (scikit-learn's digits): schedule, methods, resume, stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app_common.events import (
    CheckpointWritten,
    EpochEnded,
    MegabatchEnded,
    MegabatchMetrics,
    Pruned,
    RunEnded,
    RunStarted,
)
from app_common.spec import JobSpec
from app_engine.checkpoint import CheckpointError
from app_engine.runner import StopRun, run

ROOT = Path(__file__).resolve().parents[1]


def digits_spec(method: str = "app", megabatches: int = 4, epochs: int = 2, **training) -> JobSpec:
    return JobSpec.from_dict(
        {
            "dataset": {"name": "digits"},
            "architecture": "cnn_small",
            "method": method,
            "sparsity": {"target": 0.634},
            "stream": {"megabatches": megabatches},
            "training": {"epochs": epochs, **training},
        }
    )


def comparable(result: dict) -> list[dict]:
    """Per-megabatch metrics without timings (which differ between runs)."""
    drop = {"wall_time_s", "train_time_s", "images_per_s"}
    return [{k: v for k, v in m.items() if k not in drop} for m in result["megabatches"]]


def run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "anytime_prune.cli", *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, **kw
    )


CHECK_ARGS = [
    "run", "--dataset", "digits", "--arch", "cnn_small", "--method", "app", "--megabatches", "4",
    "--target-sparsity", "0.634", "--epochs", "3",
]


def test_cli_app_run_follows_schedule_and_learns(tmp_path):
    """The issue's acceptance command, run as a user would. Its speed is a benchmark's business
    (bench/), not a test's: the timeout below only guards against a hang (about 10x a normal run)."""
    proc = run_cli([*CHECK_ARGS, "--out", str(tmp_path / "D")])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    result = json.loads((tmp_path / "D" / "result.json").read_text())
    densities = [m["density"] for m in result["megabatches"]]
    assert densities == pytest.approx([0.800, 0.617, 0.476, 0.366], abs=0.002)
    assert [m["index"] for m in result["megabatches"]] == [1, 2, 3, 4]
    assert result["final_test_accuracy"] > 0.9
    assert result["cer"] == sum(m["test_errors"] for m in result["megabatches"])
    for m in result["megabatches"]:
        assert 0.0 <= m["test_accuracy"] <= 1.0 and 0.0 <= m["val_accuracy"] <= 1.0
        assert m["generalization_gap"] == pytest.approx(100 * (m["train_accuracy"] - m["val_accuracy"]))
    for name in ("model.safetensors", "masks.safetensors", "model.sparse.safetensors", "manifest.json", "report.png"):
        assert name in result["artifacts"], name
        assert (tmp_path / "D" / name).exists()
    assert "megabatch" in out and "CER" in out  # the per-megabatch table


@pytest.mark.parametrize("method,expected", [("osp", 0.366), ("dense", 1.0)])
def test_baselines_keep_their_density(tmp_path, method, expected):
    events: list = []
    outcome = run(digits_spec(method, megabatches=3, epochs=1), tmp_path, callbacks=[events.append])
    densities = [m["density"] for m in outcome.result["megabatches"]]
    assert densities == pytest.approx([expected] * 3, abs=0.002)
    pruned = [e for e in events if isinstance(e, Pruned)]
    assert [e.megabatch for e in pruned] == ([1] if method == "osp" else [])


def test_events_in_order(tmp_path):
    events: list = []
    run(digits_spec("app", megabatches=2, epochs=2), tmp_path, callbacks=[events.append])
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunEnded"
    per_mb = ["Pruned", "EpochEnded", "EpochEnded", "ModelWritten", "CheckpointWritten", "MegabatchEnded"]
    assert kinds[1:-1] == per_mb * 2
    ended = [e for e in events if isinstance(e, MegabatchEnded)]
    assert [e.metrics.index for e in ended] == [1, 2]
    assert all(isinstance(e.metrics, MegabatchMetrics) for e in ended)
    assert isinstance(events[0], RunStarted) and events[0].resumed_after == 0
    assert isinstance(events[-1], RunEnded) and not events[-1].stopped
    epochs = [e for e in events if isinstance(e, EpochEnded)]
    assert [(e.megabatch, e.epoch) for e in epochs] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    # Checkpoint paths name the file inside the run folder, never this host's layout.
    written = [e for e in events if isinstance(e, CheckpointWritten)]
    assert [e.path for e in written] == ["checkpoints/megabatch-0001.pt", "checkpoints/megabatch-0002.pt"]
    assert (tmp_path / written[-1].path).is_file()


def test_callback_stops_the_run_and_rerun_resumes(tmp_path):
    spec = digits_spec("app", megabatches=3, epochs=2)

    def stop_after_first_megabatch(event):
        if isinstance(event, MegabatchEnded) and event.megabatch == 1:
            raise StopRun("enough")

    events: list = []
    outcome = run(spec, tmp_path, callbacks=[stop_after_first_megabatch, events.append])
    assert outcome.stopped and outcome.stop_reason == "enough"
    assert len(outcome.result["megabatches"]) == 1
    # Every callback saw every event, whatever their order.
    assert isinstance(events[-1], RunEnded) and events[-1].stopped

    resumed: list = []
    final = run(spec, tmp_path, callbacks=[resumed.append])
    assert not final.stopped
    assert resumed[0].resumed_after == 1
    assert [e.megabatch for e in resumed if isinstance(e, MegabatchEnded)] == [2, 3]
    uninterrupted = run(spec, tmp_path / "straight")
    assert comparable(final.result) == comparable(uninterrupted.result)


def test_folder_of_another_spec_is_refused(tmp_path):
    run(digits_spec("dense", megabatches=1, epochs=1), tmp_path)
    with pytest.raises(CheckpointError, match="different spec"):
        run(digits_spec("osp", megabatches=1, epochs=1), tmp_path)


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    spec = digits_spec("app", megabatches=3, epochs=1)
    stop_at = {"n": 2}

    def stop(event):
        if isinstance(event, MegabatchEnded) and event.megabatch == stop_at["n"]:
            raise StopRun()

    run(spec, tmp_path, callbacks=[stop])
    newest = tmp_path / "checkpoints" / "megabatch-0002.pt"
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    newest.write_bytes(bytes(blob))
    events: list = []
    final = run(spec, tmp_path, callbacks=[events.append])
    assert events[0].resumed_after == 1  # megabatch 2 was redone from the checkpoint of 1
    assert comparable(final.result) == comparable(run(spec, tmp_path / "straight").result)


def test_killed_process_resumes_to_identical_metrics(tmp_path):
    """SIGKILL a real `anytime-prune run` after megabatch 2, run again, compare with a straight run."""
    args = [*CHECK_ARGS, "--epochs", "2", "--megabatches", "4"]
    killed_dir = tmp_path / "killed"
    proc = run_cli([*args, "--out", str(killed_dir)])
    record = killed_dir / "checkpoint.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if record.exists() and any(c["megabatch"] >= 2 for c in json.loads(record.read_text())["checkpoints"]):
            break
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed_dir / "result.json").exists(), "the run finished before it could be killed"

    again = run_cli([*args, "--out", str(killed_dir)])
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert "resuming after megabatch" in out
    straight = run_cli([*args, "--out", str(tmp_path / "straight")])
    out2, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out2
    resumed = json.loads((killed_dir / "result.json").read_text())
    expected = json.loads((tmp_path / "straight" / "result.json").read_text())
    assert comparable(resumed) == comparable(expected)
    assert resumed["cer"] == expected["cer"]


def test_cpu_runs_are_bit_reproducible(tmp_path):
    spec = digits_spec("app", megabatches=2, epochs=1, seed=7)
    a = run(spec, tmp_path / "a")
    b = run(spec, tmp_path / "b")
    assert comparable(a.result) == comparable(b.result)
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fingerprint_is_of_the_submitted_spec_so_another_data_root_resumes(tmp_path):
    """Two workers with different data folders run the same job: the checkpoint written under one
    data_root resumes under the other (the fingerprint ignores where the data folder lives)."""
    import numpy as np

    from app_engine.data import load_dataset

    digits = load_dataset(JobSpec().dataset, seed=0)
    for root in ("host_a", "host_b"):
        (tmp_path / root).mkdir()
        np.savez(tmp_path / root / "d.npz", x_train=digits.x_train.numpy(), y_train=digits.y_train.numpy(),
                 x_test=digits.x_test.numpy(), y_test=digits.y_test.numpy())
    spec = JobSpec.from_dict({
        "dataset": {"name": "npz", "path": "d.npz"}, "architecture": "cnn_small", "method": "app",
        "stream": {"megabatches": 2}, "training": {"epochs": 1},
    })

    def stop(event):
        if isinstance(event, MegabatchEnded) and event.megabatch == 1:
            raise StopRun("moved to another host")

    out = tmp_path / "job"
    first = run(spec, out, callbacks=[stop], data_root=tmp_path / "host_a")
    assert first.stopped
    events: list = []
    final = run(spec, out, callbacks=[events.append], data_root=tmp_path / "host_b")
    assert events[0].resumed_after == 1 and not final.stopped
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec_fingerprint"] == spec.fingerprint()
    assert json.loads((out / "checkpoint.json").read_text())["spec_fingerprint"] == spec.fingerprint()


def test_one_sample_scoring_tail_joins_the_batch_before(tmp_path):
    """The issue's crash: resnet18 at 8x8 ends in 1x1 maps, so a scoring batch of one sample
    failed in train-mode batch norm (megabatch 359, k = 72 scoring samples, batches of 71)."""
    spec = JobSpec.from_dict({
        "dataset": {"name": "digits"}, "architecture": "resnet18", "method": "app",
        "stream": {"megabatches": 4}, "training": {"epochs": 1, "batch_size": 71},
    })

    def stop_after_pruning(event):
        if isinstance(event, Pruned):
            raise StopRun("pruned once")

    events: list = []
    outcome = run(spec, tmp_path, callbacks=[stop_after_pruning, events.append])
    assert outcome.stopped and outcome.stop_reason == "pruned once"
    pruned = [e for e in events if isinstance(e, Pruned)]
    assert len(pruned) == 1 and pruned[0].density == pytest.approx(0.8, abs=1e-3)


def test_scoring_source_first_and_score_batch_size(tmp_path, monkeypatch):
    import app_engine.runner as runner_module

    seen: list[list[torch.Tensor]] = []
    real_prune = runner_module.prune

    def spy(*args, **kw):
        seen.append([x for x, _ in kw["batches"]])
        return real_prune(*args, **kw)

    monkeypatch.setattr(runner_module, "prune", spy)
    spec = JobSpec.from_dict({
        "dataset": {"name": "digits"}, "architecture": "cnn_small", "method": "app",
        "sparsity": {"score_source": "first", "score_batch_size": 10},
        "stream": {"megabatches": 4}, "training": {"epochs": 1},
    })

    def stop(event):
        if isinstance(event, Pruned) and event.megabatch == 2:
            raise StopRun()

    run(spec, tmp_path, callbacks=[stop])
    assert len(seen) == 2
    # k = ceil(0.2 * 359) = 72 samples in batches of 10: seven of 10 and a tail of 2.
    assert [len(x) for x in seen[0]] == [10] * 7 + [2]
    # "first": megabatch 2 is scored on the same samples as megabatch 1.
    assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[1], strict=True))


def test_clean_train_accuracy_and_momentum_carry_resume_identically(tmp_path):
    spec = digits_spec("app", megabatches=3, epochs=1, momentum_carry=True, decay_norms_and_biases=True)

    def stop(event):
        if isinstance(event, MegabatchEnded) and event.megabatch == 1:
            raise StopRun()

    run(spec, tmp_path / "resumed", callbacks=[stop])
    resumed = run(spec, tmp_path / "resumed")
    straight = run(spec, tmp_path / "straight")
    assert comparable(resumed.result) == comparable(straight.result)
    for m in straight.result["megabatches"]:
        assert 0.0 <= m["train_accuracy_clean"] <= 1.0
        assert m["generalization_gap_clean"] == pytest.approx(100 * (m["train_accuracy_clean"] - m["val_accuracy"]))
        assert m["generalization_gap"] == pytest.approx(100 * (m["train_accuracy"] - m["val_accuracy"]))


def test_uploaded_dataset_runs_only_with_its_data(tmp_path):
    """dataset.id: the engine never reads the service's store; the worker hands it the data, and the
    run keeps the spec (and its fingerprint) as submitted."""
    from app_engine.data import load_dataset
    from app_engine.errors import SpecInputError

    spec = JobSpec.from_dict({
        "dataset": {"name": "npz", "id": "a" * 32}, "architecture": "mlp", "method": "dense",
        "stream": {"megabatches": 1}, "training": {"epochs": 1},
    })
    with pytest.raises(SpecInputError, match="dataset.id names an uploaded dataset: submit the job to the service"):
        run(spec, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    data = load_dataset(JobSpec.from_dict({"dataset": {"name": "digits"}}).dataset, seed=0)
    outcome = run(spec, tmp_path / "given", data=data)
    assert outcome.result["megabatches"][0]["test_accuracy"] > 0.5
    # The checkpoint carries the submitted spec's fingerprint: a second run (another host) resumes it.
    assert run(spec, tmp_path / "given", data=data).result["megabatches"] == outcome.result["megabatches"]
