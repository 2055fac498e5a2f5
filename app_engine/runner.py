"""One runner for every method: dense, anytime OSP and APP differ only in their masks.

For each megabatch t = 1..N (APP_SPEC.md sections 1-3):

1. prune when the schedule says so (APP: before every megabatch, to the schedule's density t; OSP:
   straight to the target before t = 1; dense: never), scoring the current model on a slice of the
   data (``sparsity.score_source``);
2. train ``epochs`` epochs on the replayed data, restoring the best-validation epoch;
3. measure (test set, clean train accuracy), write a checkpoint, emit the events.

Re-running into the same folder resumes after the last committed megabatch. A callback stops the
run by raising :class:`StopRun`; the runner lets it unwind to one place, which writes the partial
result.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import app_engine
from app_common.events import (
    CheckpointWritten,
    Event,
    MegabatchEnded,
    MegabatchMetrics,
    ModelWritten,
    Pruned,
    RunEnded,
    RunStarted,
)
from app_common.spec import JobSpec
from app_engine.checkpoint import load_checkpoint, save_checkpoint
from app_engine.data import DataOptions, Dataset, load_dataset
from app_engine.errors import SpecInputError
from app_engine.export import export_artifacts
from app_engine.files import atomic_write_json, private_folder
from app_engine.megabatch_export import export_megabatch_model
from app_engine.models import create_model, prunable_parameters
from app_engine.pruning import Masks, prune
from app_engine.schedule import PruneSchedule
from app_engine.stream import Stream, few_shot_indices
from app_engine.train import (
    MegabatchTraining,
    Runtime,
    batch_bounds,
    evaluate,
    gather,
    peak_memory,
    reset_peak_memory,
    resolve_runtime,
    train_megabatch,
)

log = logging.getLogger(__name__)

Callback = Callable[[Event], None]
# Clean train accuracy is measured on at most this many of the step's training samples.
CLEAN_TRAIN_SAMPLES = 1000
# Purposes of the random streams derived from (seed, megabatch), see _seed_for.
_PURPOSE_PRUNE = 1
_PURPOSE_TRAIN = 2
_PURPOSE_CLEAN = 3


class StopRun(Exception):
    """Raise from a callback to stop the run. Every callback still sees the event; the run then
    ends at once (a megabatch not finished is redone on resume) and writes a partial result."""

    def __init__(self, reason: str = "stopped by a callback"):
        super().__init__(reason)
        self.reason = reason


@dataclass
class RunResult:
    result: dict[str, Any]  # the content of result.json
    artifacts: dict[str, dict[str, Any]]  # name -> {path, format, bytes, sha256}
    stopped: bool = False
    stop_reason: str | None = None


def _seed_for(seed: int, megabatch: int, purpose: int) -> int:
    # Every random stream of the run derives from (seed, megabatch, purpose), so a resumed run
    # draws exactly what an uninterrupted one would have drawn.
    return (seed * 1_000_003 + megabatch * 7_919 + purpose) % (2**63 - 1)


def resolve_dataset_path(spec: JobSpec, data_root: Path | None) -> JobSpec:
    """Resolve a relative ``dataset.path`` against ``data_root`` (the service's data folder)."""
    path = spec.dataset.path
    if path is None or data_root is None or Path(path).is_absolute():
        return spec
    dataset = spec.dataset.model_copy(update={"path": str(Path(data_root) / path)})
    return spec.model_copy(update={"dataset": dataset})


class _Emitter:
    """Delivers each event to every callback, then raises :class:`StopRun` if any of them asked
    to stop (now or at an earlier deferred event)."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)
        self.stop_reason: str | None = None

    def __call__(self, event: Event, *, defer_stop: bool = False) -> None:
        for callback in self.callbacks:
            try:
                callback(event)
            except StopRun as stop:
                self.stop_reason = self.stop_reason or stop.reason
        if self.stop_reason is not None and not defer_stop:
            raise StopRun(self.stop_reason)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate())}
    np_state: Any = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state: Any = ("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), state["numpy"]["pos"])
    np.random.set_state(np_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _batches(
    x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, batch_size: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(gather(x, idx[a:b], device), gather(y, idx[a:b], device)) for a, b in batch_bounds(len(idx), batch_size)]


def model_info(spec: JobSpec, data: Dataset) -> dict[str, Any]:
    return {
        "architecture": spec.architecture,
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "mean": list(data.mean),
        "std": list(data.std),
        "classes": list(data.classes),
    }


@dataclass
class _State:
    """What a run carries from one megabatch to the next (and what a checkpoint restores)."""

    model: nn.Module
    params: dict[str, nn.Parameter]
    masks: Masks
    records: list[MegabatchMetrics] = field(default_factory=list)
    optimizer_state: dict[str, Any] | None = None
    # The kept model of each megabatch (export.keep_every_megabatch), as export_megabatch_model returns it.
    models: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> int:
        return len(self.records)


def _build(spec: JobSpec, data: Dataset, rt: Runtime) -> _State:
    """The seeded initial model with all-ones masks over its prunable weights."""
    torch.manual_seed(spec.training.seed)
    model = create_model(
        spec.architecture, input_shape=data.input_shape, num_classes=data.num_classes, mean=data.mean, std=data.std
    ).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from the stub
    params = prunable_parameters(model)
    return _State(model=model, params=params, masks=Masks.ones(params))


def _resume(state: _State, checkpoint: dict[str, Any], rt: Runtime) -> None:
    """Restore model, masks, metrics, optimizer and RNG state after the checkpoint's megabatch."""
    state.model.load_state_dict(checkpoint["model"])
    state.masks.load_state_dict(checkpoint["masks"])
    state.masks = state.masks.to(rt.device)
    state.masks.apply_(state.model)
    state.records = [MegabatchMetrics.from_dict(m) for m in json.loads(checkpoint["metrics"])]
    state.models = json.loads(checkpoint.get("models", "[]"))
    state.optimizer_state = checkpoint.get("optimizer")
    _set_rng_state(checkpoint["rng"])


def _checkpoint(state: _State, t: int) -> dict[str, Any]:
    return {
        "megabatch": t,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer_state,
        "masks": state.masks.state_dict(),
        "rng": _rng_state(),
        "metrics": json.dumps([r.to_dict() for r in state.records]),
        "models": json.dumps(state.models),
    }


def _measure(
    state: _State,
    t: int,
    trained: MegabatchTraining,
    *,
    schedule: PruneSchedule,
    train_idx: torch.Tensor,
    val_idx: torch.Tensor,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    rt: Runtime,
    seed: int,
    started: float,
) -> MegabatchMetrics:
    """The metrics of megabatch ``t`` after training (the best-validation epoch restored)."""
    test_correct, test_total = evaluate(state.model, test[0], test[1], rt)
    # Clean train accuracy: eval mode, no augmentation, on a fixed seeded subset of the samples
    # trained on at this step (the running one is over augmented batches while the weights move).
    gen = torch.Generator().manual_seed(_seed_for(seed, t, _PURPOSE_CLEAN))
    subset = train_idx[torch.randperm(len(train_idx), generator=gen)[:CLEAN_TRAIN_SAMPLES]].to(train[0].device)
    clean_correct, clean_total = evaluate(state.model, train[0][subset], train[1][subset], rt)
    clean = clean_correct / clean_total
    return MegabatchMetrics(
        index=t,
        train_samples=len(train_idx),
        val_samples=len(val_idx),
        target_density=schedule.target(t),
        density=state.masks.density(),
        layer_density=state.masks.layer_density(),
        nonzero_params=int(sum(int((p != 0).sum()) for p in state.model.parameters())),
        prunable_params=state.masks.total(),
        test_accuracy=test_correct / test_total,
        test_errors=test_total - test_correct,
        test_total=test_total,
        val_accuracy=trained.val_accuracy,
        train_accuracy=trained.train_accuracy,
        # Percentage points (APP_SPEC section 3): of the selected epoch, and of the last epoch
        # as the reference logged it.
        generalization_gap=100.0 * (trained.train_accuracy - trained.val_accuracy),
        generalization_gap_last=100.0 * (trained.train_accuracy_last - trained.val_accuracy_last),
        selected_epoch=trained.selected_epoch,
        train_loss=trained.train_loss,
        wall_time_s=time.perf_counter() - started,
        train_time_s=trained.train_seconds,
        images_per_s=trained.images / max(trained.train_seconds, 1e-9),
        epochs=trained.epochs,
        train_accuracy_clean=clean,
        generalization_gap_clean=100.0 * (clean - trained.val_accuracy),
        peak_gpu_memory_bytes=peak_memory(rt),
    )


def run(
    spec: JobSpec,
    out_dir: Path | str,
    *,
    callbacks: Sequence[Callback] = (),
    data: Dataset | None = None,
    data_root: Path | None = None,
    data_options: DataOptions | None = None,
) -> RunResult:
    """Run ``spec`` into ``out_dir`` (resuming if it holds a checkpoint of the same spec).

    A spec naming an uploaded dataset (``dataset.id``) runs only with its ``data`` loaded by the
    caller (the service's worker, from its dataset cache): the engine never reads the store.
    ``data_options`` (memory cap, cache folder) apply when the runner loads the data itself.
    """
    if data is None and spec.dataset.id is not None:
        raise SpecInputError("dataset.id names an uploaded dataset: submit the job to the service")
    out_dir = Path(out_dir)
    private_folder(out_dir)
    # The fingerprint is of the spec as submitted: a worker on another host, with its data folder
    # elsewhere, must recognise the same run (and resume its checkpoints).
    fingerprint = spec.fingerprint()
    submitted = spec
    spec = resolve_dataset_path(spec, data_root)
    checkpoint = load_checkpoint(out_dir, fingerprint)
    emit = _Emitter(callbacks)
    t_start = time.perf_counter()

    tr, st, sp = spec.training, spec.stream, spec.sparsity
    rt = resolve_runtime(tr.device, tr.precision)
    if data is None:
        data = load_dataset(spec.dataset, seed=tr.seed, options=data_options)
    augment_mode = tr.augment
    if augment_mode == "auto":
        augment_mode = "crop_flip" if spec.dataset.name in ("cifar10", "cifar100", "imagefolder") else "none"

    pool = few_shot_indices(data.y_train, spec.dataset.few_shot, tr.seed) if spec.dataset.few_shot else None
    stream = Stream(len(data.y_train), st, tr.seed, pool=pool)
    # The whole set moves to the device once; a streamed one (larger than the memory cap) stays
    # in host memory and its batches move as they are used.
    home = torch.device("cpu") if data.streamed else rt.device
    x_train, y_train = data.x_train.to(home), data.y_train.to(home)
    x_test, y_test = data.x_test.to(home), data.y_test.to(home)

    state = _build(spec, data, rt)
    info = model_info(spec, data)
    schedule = PruneSchedule.for_method(spec.method, sp.resolved_tau, st.megabatches)
    total_params = sum(p.numel() for p in state.model.parameters())
    if checkpoint is not None:
        _resume(state, checkpoint, rt)
        log.info("resuming %s after megabatch %d of %d", out_dir, state.done, st.megabatches)

    try:
        emit(RunStarted(megabatches=st.megabatches, epochs=tr.epochs, resumed_after=state.done,
                        device=str(rt.device), precision=rt.precision))
        for t in range(state.done + 1, st.megabatches + 1):
            t0 = time.perf_counter()
            reset_peak_memory(rt)
            train_idx, val_idx = stream.train_indices(t), stream.val_indices(t)
            keep = schedule.prune_to(t)
            if keep is not None:
                score_idx = stream.score_indices(t, sp.score_fraction, sp.score_source)
                state.masks = prune(
                    state.model, state.params, state.masks, pruner=sp.pruner, keep=keep, scope=sp.scope,
                    batches=_batches(x_train, y_train, score_idx, sp.score_batch_size or tr.batch_size, rt.device),
                    seed=_seed_for(tr.seed, t, _PURPOSE_PRUNE),
                )
                emit(Pruned(megabatch=t, target_density=keep, density=state.masks.density(), pruner=sp.pruner))
            trained = train_megabatch(
                state.model, apply_masks=partial(state.masks.apply_, state.model), x=x_train, y=y_train,
                train_idx=train_idx, val_idx=val_idx, spec=tr, augment_mode=augment_mode, rt=rt,
                gen=torch.Generator().manual_seed(_seed_for(tr.seed, t, _PURPOSE_TRAIN)), megabatch=t, emit=emit,
                optimizer_state=state.optimizer_state if tr.momentum_carry else None,
            )
            state.optimizer_state = trained.optimizer_state
            record = _measure(
                state, t, trained, schedule=schedule, train_idx=train_idx, val_idx=val_idx,
                train=(x_train, y_train), test=(x_test, y_test), rt=rt, seed=tr.seed, started=t0,
            )
            state.records.append(record)
            if spec.export.keep_every_megabatch:
                # Before the checkpoint: a committed megabatch always has its model on disk.
                state.models.append(export_megabatch_model(
                    state.model, state.masks.state_dict(), out_dir, record=record, spec=submitted, model_info=info,
                ))
            path = save_checkpoint(out_dir, t, _checkpoint(state, t), fingerprint)
            log.info(
                "megabatch %d/%d: test accuracy %.4f, density %.4f, generalisation gap %+.2f pp (%.1fs)",
                t, st.megabatches, record.test_accuracy, record.density, record.generalization_gap, record.wall_time_s,
            )
            # The events of a finished megabatch reach every callback before a stop takes effect.
            if spec.export.keep_every_megabatch:
                kept = state.models[-1]
                emit(ModelWritten(megabatch=t, **{k: v for k, v in kept.items() if k != "index"}), defer_stop=True)
            emit(CheckpointWritten(megabatch=t, path=path.relative_to(out_dir).as_posix()), defer_stop=True)
            emit(MegabatchEnded(megabatch=t, megabatches=st.megabatches, metrics=record))
    except StopRun:
        log.info("run stopped after megabatch %d of %d: %s", state.done, st.megabatches, emit.stop_reason)

    return _finish(submitted, spec, state, data, rt, out_dir, emit, total_params=total_params, started=t_start)


def _finish(
    submitted: JobSpec,
    spec: JobSpec,
    state: _State,
    data: Dataset,
    rt: Runtime,
    out_dir: Path,
    emit: _Emitter,
    *,
    total_params: int,
    started: float,
) -> RunResult:
    """Write result.json (and, for a completed run, the artifacts) and emit RunEnded."""
    records = state.records
    stopped = len(records) < spec.stream.megabatches
    result = _summary(spec, records, rt, stopped, emit.stop_reason)
    result["megabatch_models"] = list(state.models)
    result["parameters"] = {"total": total_params, "prunable": state.masks.total(),
                            "nonzero": records[-1].nonzero_params if records else total_params}
    artifacts: dict[str, dict[str, Any]] = {}
    if not stopped:
        artifacts = export_artifacts(
            state.model, state.masks.state_dict(), out_dir, spec=submitted, model_info=model_info(spec, data),
            metrics={"megabatches": result["megabatches"], **{k: v for k, v in result.items() if k != "megabatches"}},
            formats=spec.export.formats,
        )
        sparse = artifacts.get("model.sparse.safetensors")
        result["sparse_model_bytes"] = sparse["bytes"] if sparse else None
    result["artifacts"] = {name: {k: v for k, v in a.items() if k != "path"} for name, a in artifacts.items()}
    result["wall_time_s"] = time.perf_counter() - started
    atomic_write_json(out_dir / "result.json", result)
    emit(RunEnded(cer=result["cer"], final_test_accuracy=result["final_test_accuracy"],
                  final_density=result["final_density"], stopped=stopped), defer_stop=True)
    return RunResult(result=result, artifacts=artifacts, stopped=stopped, stop_reason=emit.stop_reason)


def _summary(spec: JobSpec, records: list[MegabatchMetrics], rt: Runtime, stopped: bool,
             stop_reason: str | None) -> dict[str, Any]:
    last = records[-1] if records else None
    return {
        "config": spec.to_dict(),
        "status": "stopped" if stopped else "completed",
        "stop_reason": stop_reason,
        "megabatches": [r.to_dict() for r in records],
        # ALMA's cumulative error rate: misclassified test samples summed over the stream, and
        # the normalised form (sum of per-megabatch error rates).
        "cer": int(sum(r.test_errors for r in records)),
        "cer_normalized": float(sum(r.test_errors / r.test_total for r in records)),
        "final_test_accuracy": last.test_accuracy if last else None,
        "final_density": last.density if last else 1.0,
        "target_density": spec.sparsity.target_density if spec.method != "dense" else 1.0,
        "device": str(rt.device),
        "precision": rt.precision,
        "engine_version": app_engine.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
