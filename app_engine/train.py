"""Training and evaluation of one megabatch (APP_SPEC.md section 1).

Performance choices (DESIGN.md, "Performance architecture"): the data lives on the device as
uint8 tensors and is augmented per batch with a few tensor ops; masks are multiplied into the
weights in place after each optimizer step (no pruning hooks in the hot loop); loss and accuracy
are accumulated on the device so the host synchronises once per epoch, not once per step.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from app_common.events import EpochEnded
from app_common.spec import TrainingSpec
from app_engine.data.prefetch import device_batches
from app_engine.errors import SpecInputError, TrainingDiverged

log = logging.getLogger(__name__)

EVAL_BATCH = 1024

_P = ParamSpec("_P")
_R = TypeVar("_R")


class BatchTooLarge(SpecInputError):
    """A batch of ``training.batch_size`` samples does not fit in the device's memory: a retry on
    the same device fails the same way, so a smaller batch size is the input's to choose."""


@dataclass(frozen=True)
class Runtime:
    """Where and how the hot loop runs."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: fp32
    channels_last: bool

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"

    def autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def _mkldnn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]  # untyped in torch


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), as oneDNN uses it.

    Without it oneDNN emulates bf16 and autocast runs slower than fp32. The probes are private
    torch functions, so a torch without them counts as "no".
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return _mkldnn_available() and any(
        bool(getattr(torch.cpu, name, lambda: False)()) for name in probes
    )


def resolve_runtime(device: str, precision: str) -> Runtime:
    """Turn the spec's ``device`` and ``precision`` into a :class:`Runtime`.

    ``auto`` precision is bf16 autocast where the hardware has fast bf16 (CUDA GPUs that support
    it, CPUs with :func:`cpu_has_native_bf16`) and fp32 elsewhere (DESIGN.md, "Performance
    architecture"): CPUs without native bf16 emulate it and run slower than in fp32. Autocast keeps
    the weights, the optimizer and the losses in fp32; only convolutions and matrix products run in
    bf16. CPU runs stay bit-for-bit reproducible on the same machine in either precision.

    Convolutions run channels_last (NHWC) on CUDA and on CPUs with oneDNN (mkldnn), whose NHWC
    convolution and batch-norm kernels are faster than the NCHW ones. The layout only changes the
    order of floating-point sums. Measured on a 2-core AMD EPYC (docs/benchmarks.md), resnet20 at
    32x32 trains ~1.3x faster in fp32 NHWC than in fp32 NCHW and ~2.1x faster in bf16 NHWC.

    On CUDA it also selects deterministic cuDNN algorithms for the process, so that a resumed run
    gives the same metrics as an uninterrupted one. ``cuda`` on a machine without a CUDA device is a
    :class:`SpecInputError` that names ``training.device``.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecInputError(_no_cuda_message())
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    if dev.type == "cuda":
        # Deterministic cuDNN algorithms, and no autotuning (whose pick can vary from run to run):
        # a run resumed from a checkpoint then reproduces an uninterrupted one on CUDA as on CPU.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    if precision == "bf16":
        dtype: torch.dtype | None = torch.bfloat16
    elif precision == "fp32":
        dtype = None
    elif dev.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    else:
        dtype = torch.bfloat16 if cpu_has_native_bf16() else None
    channels_last = dev.type == "cuda" or _mkldnn_available()
    return Runtime(device=dev, autocast_dtype=dtype, channels_last=channels_last)


def _no_cuda_message() -> str:
    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is a CPU-only build"
    else:
        why = f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) finds no usable GPU"
    return (
        f"training.device is 'cuda' but this machine has no CUDA device: {why}; use training.device 'auto' "
        "(a GPU when there is one) or 'cpu', or run the job on a GPU worker"
    )


def reset_peak_memory(rt: Runtime) -> None:
    """Start a new peak for :func:`peak_memory` (CUDA; nothing to do on a CPU)."""
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)


def peak_memory(rt: Runtime) -> int | None:
    """The most device memory that tensors held at once since :func:`reset_peak_memory`, in bytes
    (``torch.cuda.max_memory_allocated``: the allocator's unused cache is not counted); None on a CPU."""
    if rt.device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(rt.device))


def _device_label(device: torch.device) -> str:
    if device.type != "cuda":
        return str(device)
    props = torch.cuda.get_device_properties(device)
    return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"


def out_of_memory_message(batch_size: int, device: torch.device, megabatch: int) -> str:
    """What :class:`BatchTooLarge` says: the field, the device, and a batch size to try."""
    if batch_size > 1:
        advice = f"use a smaller batch size, e.g. training.batch_size: {batch_size // 2}"
    else:
        advice = "even one sample does not fit: use a smaller architecture or smaller images"
    return (
        f"training.batch_size {batch_size} does not fit in the memory of {_device_label(device)} "
        f"(out of memory in megabatch {megabatch}); {advice}"
    )


def _explains_out_of_memory(train: Callable[_P, _R]) -> Callable[_P, _R]:
    """Turn the device's out-of-memory error inside ``train`` (keyword arguments ``spec``, ``rt``,
    ``megabatch``) into a :class:`BatchTooLarge` that names ``training.batch_size``."""

    @functools.wraps(train)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return train(*args, **kwargs)
        except torch.cuda.OutOfMemoryError as exc:  # torch.OutOfMemoryError, whatever the device
            # The text only: a log record holding the error would keep its frames' tensors alive.
            log.warning("out of device memory: %s", str(exc))
        # Out of memory. Raised here, outside the handler: the failed step's frames and tensors go
        # with the original error (a chained one would keep them), and the cache returns to the device.
        spec, rt, megabatch = kwargs["spec"], kwargs["rt"], kwargs["megabatch"]
        assert isinstance(spec, TrainingSpec) and isinstance(rt, Runtime) and isinstance(megabatch, int)
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()
        raise BatchTooLarge(out_of_memory_message(spec.batch_size, rt.device, megabatch))

    return wrapper


def augment(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding of H/8) and horizontal flip of a uint8 batch ``[B, C, H, W]``.

    Offsets and flips are drawn from ``gen`` on the CPU (so a run is reproducible on any device)
    and applied on the batch's device by gather-style indexing.
    """
    if mode == "none" or x.dim() != 4:
        return x
    b, _, h, w = x.shape
    pad = max(1, h // 8)
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=gen).to(x.device)
    flips = torch.rand(b, generator=gen).to(x.device) < 0.5
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # [B, W]
    if mode == "crop_flip":
        # Flipping is reading the crop's columns right to left.
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indexing puts the broadcast index dims first: [B, H, W, C] -> [B, C, H, W].
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def gather(x: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x[idx]`` on ``device``: indexed where ``x`` lives, then moved. For device-resident data
    both moves are no-ops; a streamed set (host memory, a memory-mapped file) sends one batch."""
    return x[idx.to(x.device)].to(device, non_blocking=True)


def _prepare(x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rt: Runtime) -> tuple[int, int]:
    """Number of correct predictions and samples; eval mode, no augmentation."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=rt.device)
    for start in range(0, len(y), EVAL_BATCH):
        # x and y may be in host memory (a streamed set): batches move to the device.
        xb = _prepare(x[start : start + EVAL_BATCH].to(rt.device, non_blocking=True), rt)
        with rt.autocast():
            logits = model(xb)
        correct += (logits.argmax(1) == y[start : start + EVAL_BATCH].to(rt.device)).sum()
    model.train(was_training)
    return int(correct.item()), len(y)


def lr_at(spec: TrainingSpec, epoch: int, step: int, steps_per_epoch: int) -> float:
    """MultiStepLR (restarted at every megabatch) with an optional linear warm-up.

    ``epoch`` is 0-based; the LR is multiplied by gamma once for each milestone <= epoch, the
    same convention as ``torch.optim.lr_scheduler.MultiStepLR`` stepped once per epoch.
    """
    lr = spec.lr * spec.gamma ** sum(1 for m in spec.resolved_milestones if m <= epoch)
    if epoch < spec.warmup_epochs:
        done = epoch * steps_per_epoch + step + 1
        lr *= done / (spec.warmup_epochs * steps_per_epoch)
    return lr


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of consecutive batches over ``n`` samples, a final batch of one sample
    merged into the one before: batch norm in train mode cannot normalise a single sample whose
    feature maps are 1x1 ("Expected more than 1 value per channel")."""
    bounds = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def make_optimizer(model: nn.Module, spec: TrainingSpec) -> torch.optim.SGD:
    """SGD with two parameter groups: weights (decayed) and 1-D parameters (biases, normalisation
    scales and shifts), exempt from weight decay unless ``spec.decay_norms_and_biases``. The two
    groups exist either way, so a carried optimizer state always fits."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    no_decay_wd = spec.weight_decay if spec.decay_norms_and_biases else 0.0
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": no_decay_wd}],
        lr=spec.lr,
        momentum=spec.momentum,
    )


@dataclass
class MegabatchTraining:
    """What one megabatch of training produced (the best-validation epoch is restored)."""

    selected_epoch: int  # 1-based
    train_accuracy: float  # of the selected epoch
    val_accuracy: float
    train_accuracy_last: float
    val_accuracy_last: float
    train_loss: float
    train_seconds: float
    images: int  # training images processed
    epochs: list[dict[str, Any]] = field(default_factory=list)
    optimizer_state: dict[str, Any] | None = None


@_explains_out_of_memory
def train_megabatch(
    model: nn.Module,
    *,
    apply_masks: Callable[[], None],
    x: torch.Tensor,
    y: torch.Tensor,
    train_idx: torch.Tensor,
    val_idx: torch.Tensor,
    spec: TrainingSpec,
    augment_mode: str,
    rt: Runtime,
    gen: torch.Generator,
    megabatch: int,
    emit: Callable[[EpochEnded], None],
    optimizer_state: dict[str, Any] | None = None,
) -> MegabatchTraining:
    """Train ``spec.epochs`` epochs on ``x[train_idx]`` and restore the best-validation epoch.

    ``apply_masks`` is called after every optimizer step to keep pruned weights at zero. ``emit``
    receives an :class:`EpochEnded` after every epoch; whatever it raises (the runner's ``StopRun``)
    ends the training there. ``optimizer_state`` (the previous megabatch's, with
    ``spec.momentum_carry``) carries the SGD momentum over. Running out of device memory raises
    :class:`BatchTooLarge`, which suggests a smaller ``training.batch_size``.
    """
    # By default a fresh SGD per megabatch: the momentum of the previous megabatch's last (not
    # selected) epoch does not leak into the restored model. The LR schedule restarts either way.
    optimizer = make_optimizer(model, spec)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    # Indices live with the data: on the device, or in host memory for a streamed set.
    train_idx = train_idx.to(x.device)
    x_val, y_val = x[val_idx.to(x.device)], y[val_idx.to(y.device)]
    n = len(train_idx)
    bs = min(spec.batch_size, n)
    # Drop a trailing batch of one sample: batch norm cannot train on it.
    steps = n // bs + (1 if n % bs > 1 else 0)
    best_val, best_state, best_epoch = -1.0, None, 0
    history: list[dict[str, Any]] = []
    images = 0
    t0 = time.perf_counter()
    model.train()
    for epoch in range(spec.epochs):
        order = train_idx[torch.randperm(n, generator=gen).to(x.device)]
        loss_sum = torch.zeros((), device=rt.device)
        correct = torch.zeros((), dtype=torch.int64, device=rt.device)
        seen = 0
        # A streamed set's batches are gathered ahead on CUDA (app_engine.data.prefetch); in line otherwise.
        cut = (order[step * bs : (step + 1) * bs] for step in range(steps))
        with contextlib.closing(device_batches(x, y, cut, rt.device)) as batches:
            for step, (raw, yb) in enumerate(batches):
                xb = _prepare(augment(raw, augment_mode, gen), rt)
                lr = lr_at(spec, epoch, step, steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with rt.autocast():
                    logits = model(xb)
                    loss = F.cross_entropy(logits, yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]  # untyped in torch
                optimizer.step()
                apply_masks()
                loss_sum += loss.detach() * len(yb)
                correct += (logits.detach().argmax(1) == yb).sum()
                seen += len(yb)
        images += seen
        val_correct, val_total = evaluate(model, x_val, y_val, rt)
        # One host synchronisation per epoch.
        train_acc = int(correct.item()) / max(seen, 1)
        train_loss = float(loss_sum.item()) / max(seen, 1)
        val_acc = val_correct / val_total
        record = {
            "epoch": epoch + 1,
            "lr": lr_at(spec, epoch, steps - 1, steps),
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "val_accuracy": val_acc,
        }
        history.append(record)
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"training diverged at megabatch {megabatch}, epoch {epoch + 1} (loss {train_loss}); "
                "lower training.lr"
            )
        if val_acc > best_val:
            best_val, best_epoch = val_acc, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
        emit(
            EpochEnded(
                megabatch=megabatch,
                epoch=epoch + 1,
                epochs=spec.epochs,
                lr=record["lr"],
                train_loss=train_loss,
                train_accuracy=train_acc,
                val_accuracy=val_acc,
            )
        )
    assert best_state is not None
    model.load_state_dict(best_state)
    best = history[best_epoch - 1]
    return MegabatchTraining(
        selected_epoch=best_epoch,
        train_accuracy=best["train_accuracy"],
        val_accuracy=best["val_accuracy"],
        train_accuracy_last=history[-1]["train_accuracy"],
        val_accuracy_last=history[-1]["val_accuracy"],
        train_loss=best["train_loss"],
        train_seconds=time.perf_counter() - t0,
        images=images,
        epochs=history,
        optimizer_state=optimizer.state_dict(),
    )
