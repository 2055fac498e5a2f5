"""A model at every megabatch (engine): each kept model loads, reproduces its recorded test
accuracy and has the schedule's density; a resumed run keeps the earlier ones; the switch turns
it off. Real training on scikit-learn's digits (small MLP, one epoch per megabatch)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from anytime_prune.cli import build_parser
from anytime_prune.engine_cli import spec_dict_from_args
from app_common.events import CheckpointWritten, MegabatchEnded, ModelWritten
from app_common.megabatch_models import MegabatchModel, best_model, model_name, read_model_index
from app_common.spec import JobSpec
from app_common.storage import LocalStorage, artifact_key
from app_engine.data import load_dataset
from app_engine.export import load_model, read_manifest, read_verified
from app_engine.files import sha256_file
from app_engine.loading import MANIFEST_FILE, SPARSE_FILE, megabatch_folder
from app_engine.models import prunable_parameters
from app_engine.runner import RunResult, StopRun, run
from app_engine.schedule import PruneSchedule
from worker.files import RunFolderMirror

MEGABATCHES = 4


def spec(keep: bool = True, megabatches: int = MEGABATCHES) -> JobSpec:
    return JobSpec.from_dict({
        "dataset": {"name": "digits"},
        "architecture": "mlp",
        "method": "app",
        "sparsity": {"target": 0.75},
        "stream": {"megabatches": megabatches},
        # fp32 on the CPU: a model loaded back computes exactly what the run measured.
        "training": {"epochs": 1, "device": "cpu", "precision": "fp32"},
        "export": {"keep_every_megabatch": keep},
    })


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunResult, list]:
    out = tmp_path_factory.mktemp("straight")
    events: list = []
    return out, run(spec(), out, callbacks=[events.append]), events


def test_every_megabatch_model_reproduces_its_test_accuracy_and_the_schedule(straight) -> None:
    out, outcome, _ = straight
    kept = [MegabatchModel.model_validate(m) for m in outcome.result["megabatch_models"]]
    records = outcome.result["megabatches"]
    assert [m.index for m in kept] == list(range(1, MEGABATCHES + 1))
    schedule = PruneSchedule.for_method("app", spec().sparsity.resolved_tau, MEGABATCHES)
    data = load_dataset(spec().dataset, seed=1)
    for m, record in zip(kept, records, strict=True):
        assert m.name == model_name(m.index) == f"megabatch-{m.index:04d}/model.sparse.safetensors"
        model = load_model(out, megabatch=m.index)
        assert load_model(out / f"megabatch-{m.index:04d}").state_dict().keys() == model.state_dict().keys()
        with torch.no_grad():
            correct = int((model(data.x_test).argmax(1) == data.y_test).sum())
        assert correct == record["test_total"] - record["test_errors"]
        assert correct / len(data.y_test) == m.test_accuracy == record["test_accuracy"]
        # The density the schedule asks for at this megabatch, and what the weights really are.
        assert m.target_density == schedule.target(m.index) == record["target_density"]
        weights = prunable_parameters(model)
        nonzero = sum(int(torch.count_nonzero(w)) for w in weights.values())
        total = sum(w.numel() for w in weights.values())
        assert m.density == record["density"] == pytest.approx(nonzero / total, abs=1e-12)
        assert m.density == pytest.approx(m.target_density, abs=2 / total)
        # The manifest beside it records that megabatch's metrics and the file's checksum.
        folder = out / f"megabatch-{m.index:04d}"
        manifest = read_manifest(folder)
        assert manifest["megabatch"] == m.index
        assert manifest["metrics"]["test_accuracy"] == m.test_accuracy
        assert manifest["density"]["target"] == m.target_density
        assert read_verified(folder, "model.sparse.safetensors", manifest)
        for f in m.files:
            assert sha256_file(out / f.name) == f.sha256 and (out / f.name).stat().st_size == f.bytes
    # Sparser as the stream goes on, as the schedule says.
    assert [m.target_density for m in kept] == sorted((m.target_density for m in kept), reverse=True)


def test_the_run_lists_them_in_its_manifest_artifacts_and_events(straight) -> None:
    out, outcome, events = straight
    listed = outcome.result["megabatch_models"]
    assert read_manifest(out)["metrics"]["megabatch_models"] == listed
    assert json.loads((out / "result.json").read_text())["megabatch_models"] == listed
    # The run's artifacts are its final files; the kept models are listed on their own.
    assert not [name for name in outcome.artifacts if "/" in name]
    assert outcome.result["megabatch_models"][-1]["files"][0]["name"] == "megabatch-0004/model.sparse.safetensors"
    kinds = [type(e).__name__ for e in events if isinstance(e, ModelWritten | CheckpointWritten | MegabatchEnded)]
    assert kinds == ["ModelWritten", "CheckpointWritten", "MegabatchEnded"] * MEGABATCHES
    written = [e for e in events if isinstance(e, ModelWritten)]
    assert [{k: v for k, v in vars(e).items() if k != "type"} for e in written] == [
        {"megabatch": m["index"], **{k: v for k, v in m.items() if k != "index"}} for m in listed
    ]
    with pytest.raises(FileNotFoundError, match="no model kept for megabatch 9"):
        load_model(out, megabatch=9)


def test_best_model_within_a_density_or_above_an_accuracy(straight) -> None:
    kept = [MegabatchModel.model_validate(m) for m in straight[1].result["megabatch_models"]]
    within = [m for m in kept if m.density <= 0.5]
    assert within  # the schedule goes below half density
    chosen = best_model(kept, max_density=0.5)
    assert chosen is not None and chosen.test_accuracy == max(m.test_accuracy for m in within)
    assert chosen.density <= 0.5
    floor = min(m.test_accuracy for m in kept)
    sparsest = best_model(kept, min_accuracy=floor)
    assert sparsest is not None and sparsest.density == min(m.density for m in kept)
    assert best_model(kept, max_density=0.01) is None
    assert best_model(kept, min_accuracy=1.01) is None
    with pytest.raises(ValueError, match="max_density, min_accuracy"):
        best_model(kept)


def test_a_resumed_run_keeps_the_earlier_models(straight, tmp_path: Path) -> None:
    """As in the service: the first worker stops after megabatch 2; another, starting from the
    store's checkpoints in an empty folder, finishes the run. The store keeps every model."""
    storage = LocalStorage(tmp_path / "store")
    job_id = "ab" * 16

    def stop_after_two(event: object) -> None:
        if isinstance(event, MegabatchEnded) and event.megabatch == 2:
            raise StopRun("enough")

    first_host = RunFolderMirror(storage, job_id, tmp_path / "host-1")
    first_host.fetch()
    first = run(spec(), first_host.out_dir, callbacks=[first_host, stop_after_two])
    assert first.stopped and [m["index"] for m in first.result["megabatch_models"]] == [1, 2]
    assert [m.index for m in read_model_index(storage, job_id).models] == [1, 2]

    second_host = RunFolderMirror(storage, job_id, tmp_path / "host-2")
    assert second_host.fetch() == 2 and [m.index for m in second_host.models.models] == [1, 2]
    events: list = []
    final = run(spec(), second_host.out_dir, callbacks=[second_host, events.append])
    assert [e.megabatch for e in events if isinstance(e, ModelWritten)] == [3, 4]
    assert not (second_host.out_dir / "megabatch-0001").exists()  # written by the first host only
    # Bit for bit the models of the uninterrupted run (CPU runs are reproducible), all in the store.
    assert final.result["megabatch_models"] == straight[1].result["megabatch_models"]
    stored = read_model_index(storage, job_id)
    assert [m.model_dump() for m in stored.models] == final.result["megabatch_models"]
    for m in stored.models:
        for f in m.files:
            data = b"".join(storage.iter_chunks(artifact_key(job_id, f.name)))
            assert hashlib.sha256(data).hexdigest() == f.sha256


def test_the_engine_and_the_service_spell_the_names_alike() -> None:
    from app_common.megabatch_models import MANIFEST_NAME, MODEL_NAME, manifest_name, megabatch_of

    assert (MODEL_NAME, MANIFEST_NAME) == (SPARSE_FILE, MANIFEST_FILE)
    for index in (1, 12, 1000):
        assert model_name(index) == f"{megabatch_folder(index)}/{SPARSE_FILE}"
        assert megabatch_of(manifest_name(index)) == megabatch_of(model_name(index)) == index
    for bad in ("megabatch-0003/../x", "megabatch-3/model.sparse.safetensors", "megabatch-0003/.hidden",
                "model.sparse.safetensors", "megabatch-0003/model.safetensors", "/megabatch-0003/manifest.json"):
        assert megabatch_of(bad) is None, bad


def test_switched_off_it_writes_none(tmp_path: Path) -> None:
    args = build_parser().parse_args(["run", "--out", "o", "--no-keep-every-megabatch"])
    assert spec_dict_from_args(args)["export"] == {"keep_every_megabatch": False}
    assert JobSpec().export.keep_every_megabatch  # on by default
    events: list = []
    outcome = run(spec(keep=False, megabatches=2), tmp_path, callbacks=[events.append])
    assert outcome.result["megabatch_models"] == []
    assert not list(tmp_path.glob("megabatch-*"))
    assert not [e for e in events if isinstance(e, ModelWritten)]
    assert not [n for n in outcome.artifacts if "/" in n]


def test_a_density_above_its_target_by_rounding_only_counts_as_the_target() -> None:
    def kept(index: int, density: float, target: float, accuracy: float) -> MegabatchModel:
        return MegabatchModel(index=index, density=density, target_density=target, test_accuracy=accuracy,
                              name=f"megabatch-{index:04d}/model.sparse.safetensors", bytes=1, sha256="0" * 64,
                              files=[])

    # Pruned to half of 10,001 weights: 5,001 kept, density 0.50005.
    half = kept(2, 5001 / 10001, 0.5, 0.9)
    assert best_model([kept(1, 1.0, 1.0, 0.95), half], max_density=0.5) == half
    # A model whose measured density is really above its target (not by rounding) does not qualify.
    assert best_model([kept(3, 0.52, 0.5, 0.9)], max_density=0.5) is None
    # Nor does one within rounding of a target that is itself above the bound.
    assert best_model([kept(4, 0.5004, 0.5003, 0.9)], max_density=0.5) is None
