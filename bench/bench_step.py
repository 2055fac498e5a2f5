"""One training step of the engine, in variants, timed step by step and interleaved.

The whole-run benchmark (``bench_train.py``) cannot resolve a change of a few per cent on a shared
2-core machine: its runs last seconds and load from elsewhere moves them by tens of per cent. Here
each variant trains its own copy of the same model on the same batch (forward under the runtime's
autocast, cross entropy, backward, SGD step, as ``train_megabatch`` does), the variants take turns
step by step, and the script prints each variant's fastest, 25th-percentile and median step and the
median over steps of the per-turn time ratio against the first variant: load that hits one turn
hits the neighbouring steps of the other variants too.

Variants: ``eager`` (the engine as it is: channels_last where resolve_runtime picks it),
``compile`` (``torch.compile`` of the model, inductor), ``nchw`` (no channels_last),
``fused`` / ``foreach`` (SGD with ``fused=True`` / ``foreach=True``).

    python bench/bench_step.py eager compile --steps 40
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app_common.spec import TrainingSpec
from app_engine.train import make_optimizer, resolve_runtime
from bench.bench_train import build_model, make_problem

VARIANTS = ("eager", "compile", "nchw", "fused", "foreach")


def make_step(variant: str, arch: str, size: int, precision: str, batch: int) -> Callable[[], None]:
    problem = make_problem(arch, size, max(2 * batch, 256), seed=0)
    rt = resolve_runtime("cpu", precision)
    channels_last = rt.channels_last and variant != "nchw"
    model = build_model(arch, size)
    model.load_state_dict(problem.init_state)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)  # type: ignore[call-overload]  # missing from the stub
    x = problem.x[:batch].contiguous(memory_format=fmt)
    y = problem.y[:batch]
    spec = TrainingSpec.model_validate({"epochs": 1, "batch_size": batch, "lr": 0.05})
    optimizer = make_optimizer(model, spec)
    if variant in ("fused", "foreach"):
        optimizer = torch.optim.SGD(optimizer.param_groups, lr=0.05, momentum=0.9, **{variant: True})
    forward = torch.compile(model, dynamic=False) if variant == "compile" else model

    def step() -> None:
        with rt.autocast():
            loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # untyped in torch
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", choices=VARIANTS)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each variant")
    args = parser.parse_args(argv)
    steps: dict[str, Callable[[], None]] = {}
    for variant in args.variants:
        t0 = time.perf_counter()
        steps[variant] = make_step(variant, args.arch, args.size, args.precision, args.batch_size)
        steps[variant]()
        print(f"{variant}: first step (set-up, compilation) {time.perf_counter() - t0:.1f} s", flush=True)
        for _ in range(3):
            steps[variant]()
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for _ in range(args.steps):
        for variant, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - t0)
    load_after = os.getloadavg()
    print(f"{args.arch} at {args.size}x{args.size}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps each; ms per step:")
    first = args.variants[0]
    for variant, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        line = f"  {variant:<8} min {min(ts) * 1e3:7.1f}  p25 {q[0] * 1e3:7.1f}  median {q[1] * 1e3:7.1f}"
        if variant != first:
            ratio = statistics.median(a / b for a, b in zip(times[first], ts, strict=True))
            fastest = min(times[first]) / min(ts)
            line += f"  speed-up over {first}: {ratio:.2f}x (median of turns), {fastest:.2f}x (fastest)"
        print(line)
    print(f"load average before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
