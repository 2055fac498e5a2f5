"""The engine on CUDA: bf16 autocast and channels_last, exact masks, resume, peak memory, clear errors.

Tests marked ``cuda`` need an NVIDIA GPU and skip elsewhere (``scripts/gpu-check.sh`` runs them on
one). The parts that a CPU can check run everywhere: the error for ``device: cuda`` on a machine
without a GPU, the out-of-memory message, and the peak-memory metric's CPU value and old records.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from app_common.events import MegabatchEnded, MegabatchMetrics, RunStarted
from app_common.spec import JobSpec, TrainingSpec
from app_engine.errors import RunInputError, SpecInputError
from app_engine.models import create_model, prunable_parameters
from app_engine.pruning import Masks, select_masks
from app_engine.runner import StopRun, run
from app_engine.train import BatchTooLarge, Runtime, resolve_runtime, train_megabatch

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA (scripts/gpu-check.sh runs these on one)"
)

# Measurements that differ between two runs of the same spec (a resumed run holds other memory).
MEASURED = {"wall_time_s", "train_time_s", "images_per_s", "peak_gpu_memory_bytes"}


def comparable(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k not in MEASURED} for m in result["megabatches"]]


def image_problem(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A small learnable uint8 image problem: the class sets the mean brightness of a channel."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=gen)
    x = torch.randint(0, 120, (n, 3, size, size), generator=gen)
    x[torch.arange(n), y % 3] += (y * 12)[:, None, None]
    return x.clamp(0, 255).to(torch.uint8), y


def pruned_model(arch: str, size: int, density: float, device: torch.device) -> tuple[nn.Module, Masks]:
    """``arch`` on ``device`` with random masks at ``density`` applied (global scope)."""
    torch.manual_seed(0)
    model = create_model(arch, input_shape=(3, size, size), num_classes=10, mean=(0.3,) * 3, std=(0.2,) * 3)
    model = model.to(device)
    params = prunable_parameters(model)
    gen = torch.Generator().manual_seed(1)
    scores = {name: torch.rand(p.shape, generator=gen) for name, p in params.items()}
    masks = select_masks(scores, Masks.ones(params), density, "global").to(device)
    masks.apply_(model)
    return model, masks


def train(
    model: nn.Module, masks: Masks, x: torch.Tensor, y: torch.Tensor, rt: Runtime,
    apply_masks: Callable[[], None] | None = None, **training: Any,
) -> Any:
    spec = TrainingSpec.model_validate({"epochs": 2, "batch_size": 64, "lr": 0.05, "weight_decay": 5e-4, **training})
    n = len(y)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    return train_megabatch(
        model, apply_masks=apply_masks or (lambda: masks.apply_(model)), x=x.to(rt.device), y=y.to(rt.device),
        train_idx=perm[n // 10 :], val_idx=perm[: n // 10], spec=spec, augment_mode="crop_flip", rt=rt,
        gen=torch.Generator().manual_seed(3), megabatch=1, emit=lambda event: None,
    )


def resnet_spec(**training: Any) -> JobSpec:
    """APP on the synthetic images (3x8x8) with resnet20: convolutions, batch norm and shortcuts."""
    return JobSpec.from_dict({
        "dataset": {"name": "synthetic", "synthetic_samples": 1200},
        "architecture": "resnet20",
        "method": "app",
        "sparsity": {"target": 0.634},
        "stream": {"megabatches": 3},
        "training": {"epochs": 2, "batch_size": 64, "seed": 5, **training},
    })


# --- on any machine ---------------------------------------------------------------------------------


def test_device_cuda_without_a_gpu_fails_at_once_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = r"^training\.device is 'cuda' but this machine has no CUDA device"
    with pytest.raises(SpecInputError, match=expected) as info:
        resolve_runtime("cuda", "auto")
    # A RunInputError: the service fails the job at once instead of retrying it.
    assert isinstance(info.value, RunInputError)
    assert "'auto'" in str(info.value) and "'cpu'" in str(info.value)
    # The runner stops before it loads data or trains anything.
    with pytest.raises(SpecInputError, match=r"training\.device"):
        run(resnet_spec(device="cuda"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert resolve_runtime("auto", "auto").device.type == "cpu"


class _OutOfMemory(nn.Module):
    """A model whose forward fails as a GPU's allocator does when a batch does not fit."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_names_the_batch_size_and_suggests_half() -> None:
    model = _OutOfMemory()
    spec = TrainingSpec.model_validate({"epochs": 1, "batch_size": 256})
    x, y = torch.randn(600, 4), torch.randint(0, 2, (600,))
    with pytest.raises(BatchTooLarge) as info:
        train_megabatch(
            model, apply_masks=lambda: None, x=x, y=y, train_idx=torch.arange(500), val_idx=torch.arange(500, 600),
            spec=spec, augment_mode="none", rt=resolve_runtime("cpu", "fp32"), gen=torch.Generator(), megabatch=3,
            emit=lambda event: None,
        )
    message = str(info.value)
    assert message.startswith("training.batch_size 256 does not fit in the memory of cpu")
    assert "megabatch 3" in message and "training.batch_size: 128" in message
    assert isinstance(info.value, RunInputError)
    # Raised outside the handler: it keeps neither the original error nor its frames' tensors.
    assert info.value.__context__ is None and info.value.__cause__ is None

    one = TrainingSpec.model_validate({"epochs": 1, "batch_size": 1})
    with pytest.raises(BatchTooLarge, match="even one sample does not fit"):
        train_megabatch(
            model, apply_masks=lambda: None, x=x, y=y, train_idx=torch.arange(500), val_idx=torch.arange(500, 600),
            spec=one, augment_mode="none", rt=resolve_runtime("cpu", "fp32"), gen=torch.Generator(), megabatch=1,
            emit=lambda event: None,
        )


def test_peak_gpu_memory_is_none_on_a_cpu_and_old_records_still_load(tmp_path: Path) -> None:
    spec = JobSpec.from_dict({
        "dataset": {"name": "synthetic", "synthetic_samples": 200}, "architecture": "cnn_small", "method": "app",
        "stream": {"megabatches": 1}, "training": {"epochs": 1, "device": "cpu"},
    })
    result = run(spec, tmp_path).result
    entry = result["megabatches"][0]
    assert "peak_gpu_memory_bytes" in entry and entry["peak_gpu_memory_bytes"] is None
    # A record written before the field existed (a checkpoint, a stored event) reads as None.
    old = {k: v for k, v in entry.items() if k != "peak_gpu_memory_bytes"}
    assert MegabatchMetrics.from_dict(old).peak_gpu_memory_bytes is None
    measured = MegabatchMetrics.from_dict({**old, "peak_gpu_memory_bytes": 123_456_789})
    assert measured.peak_gpu_memory_bytes == 123_456_789
    assert MegabatchMetrics.from_dict(measured.to_dict()) == measured


# --- on an NVIDIA GPU ---------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
def test_bf16_autocast_and_channels_last_on_cuda() -> None:
    rt = resolve_runtime("cuda", "auto")
    assert rt.device.type == "cuda" and rt.channels_last
    assert rt.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    x, y = image_problem(640, 32)
    for precision in ("bf16", "fp32"):
        rt = resolve_runtime("cuda", precision)
        model, masks = pruned_model("resnet20", 32, 0.5, rt.device)
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        seen: list[tuple[torch.dtype, bool]] = []

        def record(module: nn.Module, inputs: object, out: torch.Tensor, seen: list[Any] = seen) -> None:
            seen.append((out.dtype, out.is_contiguous(memory_format=torch.channels_last)))

        first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        first_conv.register_forward_hook(record)
        trained = train(model, masks, x, y, rt)
        expected = torch.bfloat16 if precision == "bf16" else torch.float32
        assert seen and all(s == (expected, True) for s in seen), seen[:3]
        # Autocast leaves the weights (and so the optimizer and the checkpoint) in fp32.
        assert all(p.dtype == torch.float32 and p.is_cuda for p in model.parameters())
        assert all(math.isfinite(e["train_loss"]) for e in trained.epochs)
        assert 0.0 <= trained.val_accuracy <= 1.0


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_masks_stay_exact_after_every_optimizer_step_on_cuda(precision: str) -> None:
    rt = resolve_runtime("cuda", precision)
    model, masks = pruned_model("resnet20", 32, 0.2, rt.device)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    named = dict(model.named_parameters())
    pruned = {name: ~masks[name] for name in masks.names()}
    moved = torch.zeros((), dtype=torch.int64, device=rt.device)
    left = torch.zeros((), dtype=torch.int64, device=rt.device)
    steps = 0

    def apply_and_check() -> None:
        nonlocal moved, left, steps
        with torch.no_grad():
            # Momentum and weight decay move pruned weights in every step (so the check means
            # something); after the multiply none may be left, exactly (no sync until the end).
            moved += sum(named[n][p].count_nonzero() for n, p in pruned.items())
            masks.apply_(model)
            left += sum(named[n][p].count_nonzero() for n, p in pruned.items())
        steps += 1

    x, y = image_problem(1280, 32)
    train(model, masks, x, y, rt, apply_and_check, momentum=0.9, weight_decay=5e-3)
    assert steps == 2 * (1152 // 64)
    assert int(moved) > 0
    assert int(left) == 0
    # The restored best epoch is as exact.
    assert all(int(named[n][p].count_nonzero()) == 0 for n, p in pruned.items())


@pytest.mark.cuda
@needs_cuda
def test_resume_on_cuda_gives_the_same_metrics_and_reports_peak_memory(tmp_path: Path) -> None:
    spec = resnet_spec(device="cuda")

    def stop_after_first(event: object) -> None:
        if isinstance(event, MegabatchEnded) and event.megabatch == 1:
            raise StopRun("stopped after megabatch 1")

    first = run(spec, tmp_path / "resumed", callbacks=[stop_after_first])
    assert first.stopped and len(first.result["megabatches"]) == 1
    events: list[object] = []
    resumed = run(spec, tmp_path / "resumed", callbacks=[events.append]).result
    started = events[0]
    assert isinstance(started, RunStarted) and started.resumed_after == 1 and started.device.startswith("cuda")
    straight = run(spec, tmp_path / "straight").result
    assert resumed["device"].startswith("cuda") and resumed["precision"] == straight["precision"]
    assert comparable(resumed) == comparable(straight)
    assert resumed["cer"] == straight["cer"]

    total = torch.cuda.get_device_properties(0).total_memory
    prunable = straight["parameters"]["prunable"]
    everything = straight["parameters"]["total"]
    for m in straight["megabatches"] + resumed["megabatches"]:
        assert isinstance(m["peak_gpu_memory_bytes"], int) and 0 < m["peak_gpu_memory_bytes"] < total
        # Pruned weights are exactly zero at every megabatch's end: at most the kept prunable
        # weights and the never-pruned parameters are nonzero.
        kept = round(m["density"] * prunable)
        assert m["nonzero_params"] <= everything - prunable + kept


@pytest.mark.cuda
@needs_cuda
def test_out_of_memory_batch_on_cuda_says_to_use_a_smaller_batch_size() -> None:
    rt = resolve_runtime("cuda", "auto")
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(rt.device)
    model, masks = pruned_model("resnet18", 32, 0.5, rt.device)
    x, y = image_problem(4400, 32)
    total = torch.cuda.get_device_properties(rt.device).total_memory
    # Cap this process at ~1 GiB: resnet18 fits, a batch of 4096 32x32 images (~10 GB of
    # activations) does not.
    torch.cuda.set_per_process_memory_fraction(min(1.0, 2**30 / total), rt.device)
    torch.cuda.reset_peak_memory_stats(rt.device)
    try:
        with pytest.raises(BatchTooLarge) as info:
            train(model, masks, x, y, rt, batch_size=4096, epochs=1)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, rt.device)
    message = str(info.value)
    assert message.startswith("training.batch_size 4096 does not fit in the memory of cuda")
    assert torch.cuda.get_device_name(rt.device) in message and "training.batch_size: 2048" in message
    # The failed step filled much of the ~1 GiB; the error does not hold on to those tensors: what
    # is still allocated is the model, its masks and the data (~120 MB).
    assert torch.cuda.max_memory_allocated(rt.device) - baseline > 256 * 2**20
    assert torch.cuda.memory_allocated(rt.device) - baseline < 256 * 2**20
    del info, model, masks
    # And a batch size that fits trains on the same device afterwards.
    model, masks = pruned_model("resnet18", 32, 0.5, rt.device)
    assert train(model, masks, x[:640], y[:640], rt, batch_size=64, epochs=1).images > 0

