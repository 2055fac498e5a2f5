"""Training throughput: the engine's hot loop against the conventional PyTorch way, in one process.

Both sides train the same architecture from the same initial weights with the same pruning masks
(density 0.366, fixed random scores) on the same fixed random uint8 dataset, for the same number of
epochs and batch size, each epoch followed by a validation pass and keeping the best-validation
weights (what an APP megabatch does). Only the way the work is done differs:

conventional (how research code, the APP reference code included, writes it)
    a ``torch.utils.data.Dataset`` that returns one float sample at a time through per-sample
    transforms written like torchvision's (random crop with zero padding of H/8, horizontal flip,
    ToTensor's /255, Normalize), a ``DataLoader`` (shuffle, ``--workers`` worker processes, 2 as in
    the reference), fp32, masks kept by ``torch.nn.utils.prune.custom_from_mask`` forward hooks,
    ``MultiStepLR``, ``.item()`` on the loss and on the accuracy after every step, validation
    through a DataLoader, ``copy.deepcopy(model.state_dict())`` on a better epoch;

engine
    ``app_engine.train.train_megabatch``: uint8 data on the device, crop/flip of a whole batch with
    a few tensor ops, masks multiplied into the weights after each step, metrics accumulated on
    the device with one host synchronisation per epoch; precision and memory format from
    ``app_engine.train.resolve_runtime`` (``--precision auto``: bf16 autocast where the hardware
    multiplies bf16 natively, fp32 elsewhere; channels_last where oneDNN or CUDA runs it).

The sides run interleaved (conventional, engine, conventional, engine, ...) after one warm-up run of
each, so that load from other processes hits both alike; the medians are reported, and the ratio of
each side's fastest run beside them. Images/s counts training images over the wall time of the
whole training call, validation passes included.

    python bench/bench_train.py --arch resnet20 --size 32 --samples 2048 --epochs 2 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

# Runnable as a plain script from a checkout: `python bench/bench_train.py`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app_common.spec import TrainingSpec
from app_engine.models import create_model, prunable_parameters
from app_engine.pruning import Masks, select_masks
from app_engine.train import Runtime, resolve_runtime, train_megabatch

DENSITY = 0.366  # APP's final density at tau = 4.5 in the paper's schedule, used for both sides
NUM_CLASSES = 10
VAL_FRACTION = 0.1  # the reference's 90 % / 10 % megabatch split
# CIFAR-10's channel statistics; the data is random, so any fixed values would do.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


# --- the shared problem ---------------------------------------------------------------------------


@dataclass
class Problem:
    x: torch.Tensor  # uint8 [N, 3, S, S]
    y: torch.Tensor  # int64 [N]
    train_idx: torch.Tensor  # int64 [n_train]
    val_idx: torch.Tensor  # int64 [n_val]
    init_state: dict[str, torch.Tensor]  # the initial weights both sides start from
    masks: dict[str, torch.Tensor]  # bool, keyed by prunable parameter name


def make_problem(arch: str, size: int, samples: int, seed: int) -> Problem:
    """A fixed random dataset, initial model and density-0.366 masks (global, random scores)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (samples, 3, size, size), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, NUM_CLASSES, (samples,), generator=gen)
    perm = torch.randperm(samples, generator=gen)
    n_val = max(1, round(VAL_FRACTION * samples))
    torch.manual_seed(seed)
    model = build_model(arch, size)
    params = prunable_parameters(model)
    scores = {name: torch.rand(p.shape, generator=gen) for name, p in params.items()}
    masks = select_masks(scores, Masks.ones(params), DENSITY, "global")
    return Problem(
        x=x,
        y=y,
        train_idx=perm[n_val:],
        val_idx=perm[:n_val],
        init_state=copy.deepcopy(model.state_dict()),
        masks=masks.state_dict(),
    )


def build_model(arch: str, size: int) -> nn.Module:
    return create_model(arch, input_shape=(3, size, size), num_classes=NUM_CLASSES, mean=MEAN, std=STD)


# --- the conventional way -------------------------------------------------------------------------
# Transforms in the style of torchvision.transforms (not available here), one sample at a time:
# each takes and returns a [C, H, W] tensor.


class RandomCrop:
    """Zero-pad by ``padding`` on every side, then cut a random ``size`` x ``size`` window."""

    def __init__(self, size: int, padding: int):
        self.size, self.padding = size, padding

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        p = self.padding
        img = F.pad(img, (p, p, p, p))
        top = int(torch.randint(0, img.shape[-2] - self.size + 1, (1,)).item())
        left = int(torch.randint(0, img.shape[-1] - self.size + 1, (1,)).item())
        return img[..., top : top + self.size, left : left + self.size]


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(1).item() < self.p:
            return img.flip(-1)
        return img


class ToTensor:
    """uint8 0..255 -> float32 0..1."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return img.to(torch.float32).div(255.0)


class Normalize:
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return (img - self.mean) / self.std


class Compose:
    def __init__(self, transforms: list[Callable[[torch.Tensor], torch.Tensor]]):
        self.transforms = transforms

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            img = t(img)
        return img


class ImageDataset(TorchDataset):
    """``(transform(x[i]), y[i])`` for a subset of a uint8 image tensor."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, transform: Compose):
        self.x, self.y, self.idx, self.transform = x, y, idx.tolist(), transform

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.idx[i]
        return self.transform(self.x[j]), int(self.y[j])


class _Identity(nn.Module):
    # The model normalises its input itself; the conventional side normalises in the transform
    # (as torchvision pipelines do), so its model copy skips that layer: no work is done twice.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def train_conventional(
    problem: Problem, arch: str, size: int, epochs: int, batch_size: int, workers: int, device: torch.device
) -> float:
    """Train the conventional way; returns the wall time in seconds (model set-up excluded)."""
    model = build_model(arch, size)
    model.load_state_dict(problem.init_state)
    model.normalize = _Identity()
    model = model.to(device)
    modules = dict(model.named_modules())
    for name in problem.masks:
        module_name = name.rsplit(".", 1)[0]
        torch_prune.custom_from_mask(modules[module_name], "weight", problem.masks[name].to(device))

    _sync(device)
    t0 = time.perf_counter()
    pad = max(1, size // 8)
    train_tf = Compose([RandomCrop(size, pad), RandomHorizontalFlip(), ToTensor(), Normalize(MEAN, STD)])
    test_tf = Compose([ToTensor(), Normalize(MEAN, STD)])
    train_loader = DataLoader(
        ImageDataset(problem.x, problem.y, problem.train_idx, train_tf),
        batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
    )
    val_loader = DataLoader(
        ImageDataset(problem.x, problem.y, problem.val_idx, test_tf),
        batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    milestones = sorted({max(1, round(epochs * 0.4)), max(1, round(epochs * 0.8))})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    criterion = nn.CrossEntropyLoss()
    best_acc, best_state = -1.0, None
    for _ in range(epochs):
        model.train()
        running_loss, correct, seen = 0.0, 0, 0
        for xb, yb in train_loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            out = model(xb)
            loss = criterion(out, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running_loss += loss.item() * len(yb)
            correct += (out.argmax(1) == yb).sum().item()
            seen += len(yb)
        scheduler.step()
        model.eval()
        val_correct, val_seen = 0, 0
        with torch.no_grad():
            for xb, yb in val_loader:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                val_correct += (model(xb).argmax(1) == yb).sum().item()
                val_seen += len(yb)
        val_acc = val_correct / val_seen
        if val_acc > best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(model.state_dict())
        if not math.isfinite(running_loss):
            raise FloatingPointError("conventional training diverged")
    assert best_state is not None
    model.load_state_dict(best_state)
    _sync(device)
    return time.perf_counter() - t0


# --- the engine -----------------------------------------------------------------------------------


def train_engine(problem: Problem, arch: str, size: int, epochs: int, batch_size: int, rt: Runtime) -> float:
    """Train with ``app_engine.train.train_megabatch``; returns the wall time in seconds."""
    model = build_model(arch, size)
    model.load_state_dict(problem.init_state)
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from the stub
    masks = Masks(problem.masks).to(rt.device)
    masks.apply_(model)
    x, y = problem.x.to(rt.device), problem.y.to(rt.device)
    spec = TrainingSpec.model_validate(
        {"epochs": epochs, "batch_size": batch_size, "lr": LR, "momentum": MOMENTUM,
         "weight_decay": WEIGHT_DECAY, "device": rt.device.type, "precision": rt.precision}
    )
    gen = torch.Generator().manual_seed(0)
    _sync(rt.device)
    t0 = time.perf_counter()
    train_megabatch(
        model, apply_masks=lambda: masks.apply_(model), x=x, y=y, train_idx=problem.train_idx,
        val_idx=problem.val_idx, spec=spec, augment_mode="crop_flip", rt=rt, gen=gen, megabatch=1,
        emit=lambda event: None,
    )
    _sync(rt.device)
    return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- driver ---------------------------------------------------------------------------------------


def _loads(loads: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in loads)


# The CPU features that decide the engine's speed here: bf16 in hardware (AVX512-BF16, AMX) and
# the vector width. Two machines with the same model name can differ in them (virtual CPUs).
_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_features() -> list[str]:
    """Which of :data:`_FEATURES` /proc/cpuinfo lists (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return [f for f in _FEATURES if f in flags]


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_features": cpu_features(),
        "logical_cpus": torch.multiprocessing.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--samples", type=int, default=2048, help="images in the dataset (10%% are validation)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side, after one warm-up each")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="the engine's precision (the conventional side is always fp32)")
    parser.add_argument("--engine-layout", choices=("auto", "nchw", "nhwc"), default="auto",
                        help="the engine's memory format "
                        "(auto: resolve_runtime's choice; the conventional side is NCHW)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the conventional side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    rt = resolve_runtime(args.device, args.precision)
    if args.engine_layout != "auto":
        rt = dataclasses.replace(rt, channels_last=args.engine_layout == "nhwc")
    problem = make_problem(args.arch, args.size, args.samples, args.seed)
    n_train = len(problem.train_idx)
    images = n_train * args.epochs  # per timed run; the last partial batch is trained by both sides
    print(
        f"{args.arch} at {args.size}x{args.size}: {n_train} train + {len(problem.val_idx)} val images, "
        f"{args.epochs} epochs, batch {args.batch_size}, density {DENSITY}, "
        f"{args.repeats} timed runs each after a warm-up; {torch.get_num_threads()} torch threads",
        flush=True,
    )

    def conventional() -> float:
        return train_conventional(
            problem, args.arch, args.size, args.epochs, args.batch_size, args.workers, rt.device
        )

    def engine() -> float:
        return train_engine(problem, args.arch, args.size, args.epochs, args.batch_size, rt)

    conventional()
    engine()
    times: dict[str, list[float]] = {"conventional": [], "engine": []}
    for r in range(args.repeats):
        for name, fn in (("conventional", conventional), ("engine", engine)):
            seconds = fn()
            times[name].append(seconds)
            print(f"  run {r + 1}/{args.repeats} {name:<12} {seconds:8.2f} s  {images / seconds:9.1f} images/s",
                  flush=True)

    rate = {name: images / statistics.median(ts) for name, ts in times.items()}
    ratio = rate["engine"] / rate["conventional"]
    # Load from other processes only ever slows a run down, so each side's fastest run is the
    # least disturbed one: its ratio is a second reading that a burst of load in one run cannot move.
    best = {name: images / min(ts) for name, ts in times.items()}
    ratio_best = best["engine"] / best["conventional"]
    load_after = os.getloadavg()
    precision = {"conventional": "fp32", "engine": rt.precision}
    layout = {"conventional": "nchw", "engine": "nhwc" if rt.channels_last else "nchw"}
    print()
    print(f"{'side':<14}{'precision':<11}{'layout':<8}{'median images/s':>16}{'best images/s':>15}")
    for name in ("conventional", "engine"):
        print(f"{name:<14}{precision[name]:<11}{layout[name]:<8}{rate[name]:>16.1f}{best[name]:>15.1f}")
    print(f"ratio engine/conventional: {ratio:.2f}x")
    print(f"ratio of the fastest runs: {ratio_best:.2f}x")
    print(f"load average (1, 5, 15 min) before {_loads(load_before)}, after {_loads(load_after)} "
          f"on {os.cpu_count()} logical CPUs")
    if args.json is not None:
        result = {
            "arch": args.arch,
            "size": args.size,
            "train_images": n_train,
            "val_images": len(problem.val_idx),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "workers": args.workers,
            "device": str(rt.device),
            "precision": precision,
            "layout": layout,
            "seconds": times,
            "images_per_s": rate,
            "ratio": ratio,
            "best_images_per_s": best,
            "ratio_best": ratio_best,
            "machine": machine(),
            "load_average": {"before": list(load_before), "after": list(load_after)},
            "command": " ".join(["python", "bench/bench_train.py", *(argv if argv is not None else sys.argv[1:])]),
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
