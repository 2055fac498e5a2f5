"""The one-shot GPU check: everything a session lent an NVIDIA GPU should run, in one command.

Steps, each timed and recorded even when another one fails:

1. ``cuda-tests``: the tests marked ``cuda`` (bf16 and channels_last, exact masks, resume, peak
   memory, the out-of-memory error);
2. ``bench``: ``bench/bench_train.py`` for resnet20 and resnet18 at 32x32, the engine against the
   conventional loop in one process (images/s of both and their ratio);
3. ``app``: APP on CIFAR-10-sized data (50,000 uint8 3x32x32 training images, 10,000 test images,
   ResNet-18, N = 8, replay full) for a few epochs per megabatch after a short warm-up run, and the
   full 50-epoch protocol extrapolated from it, megabatch by megabatch;
4. ``serve``: one job end to end through ``anytime-prune serve --queue gpu`` (embedded Redis, a
   worker, the API) and the Python client, its files downloaded.

Then one table (printed) and the same as JSON, with each speed goal of issue 10 marked met or not.
Without a CUDA device (or with ``--dry-run``) it says so and runs the same steps in tiny sizes on
the CPU (8x8 images, the small CNN instead of the ResNets); that dry run exits 0 when every step
works. ``scripts/gpu-check.sh`` installs the service's
dependencies from ``wheelhouse/`` first where they are missing, then runs this.

    bash scripts/gpu-check.sh                       # on the GPU machine
    python scripts/gpu_check.py --dry-run --out x.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the working tree's code, also when an older wheel is installed

import torch  # noqa: E402

PROTOCOL_EPOCHS = 50  # the paper's epochs per megabatch
GOAL_DENSE_IMAGES_S = 45_000  # ResNet-18 32x32 on an H100-class GPU
GOAL_PROTOCOL_S = 300.0  # the full APP protocol (ResNet-18, CIFAR-10 size, N = 8, 50 epochs)
GOAL_PROTOCOL_RATIO = 10.0  # ... against the conventional loop


@dataclass(frozen=True)
class Sizes:
    """How big each step is: the real check on a GPU, tiny on a CPU."""

    device: str
    bench_archs: tuple[str, ...]
    bench: list[str]  # bench_train.py arguments shared by the architectures
    app_samples: int
    app_test: int
    app_size: int
    app_arch: str
    app_megabatches: int
    app_epochs: int
    app_batch: int
    warmup_samples: int  # 0: no warm-up run
    serve_spec: dict[str, Any]
    serve_timeout_s: float


def sizes(gpu: bool, app_epochs: int) -> Sizes:
    # On a CPU the digits job goes to the gpu queue with device 'auto', which runs it on the CPU.
    serve_spec: dict[str, Any] = {
        "dataset": {"name": "digits"}, "architecture": "cnn_small", "method": "app", "sparsity": {"target": 0.634},
        "stream": {"megabatches": 2},
        "training": {"epochs": 2 if gpu else 1, "batch_size": 32, "device": "cuda" if gpu else "auto"},
    }
    if gpu:
        return Sizes(
            device="cuda",
            bench_archs=("resnet20", "resnet18"),
            bench=["--size", "32", "--samples", "20480", "--epochs", "2", "--repeats", "3", "--workers", "2",
                   "--device", "cuda"],
            app_samples=50_000, app_test=10_000, app_size=32, app_arch="resnet18", app_megabatches=8,
            app_epochs=app_epochs, app_batch=128, warmup_samples=4096, serve_spec=serve_spec, serve_timeout_s=240,
        )
    return Sizes(
        device="cpu",
        bench_archs=("cnn_small",),
        bench=["--size", "8", "--samples", "48", "--epochs", "1", "--repeats", "1", "--workers", "0",
               "--device", "cpu"],
        app_samples=160, app_test=40, app_size=8, app_arch="cnn_small", app_megabatches=2, app_epochs=1,
        app_batch=32, warmup_samples=0, serve_spec=serve_spec, serve_timeout_s=240,
    )


# --- the steps --------------------------------------------------------------------------------------


def cuda_tests(work: Path, sz: Sizes) -> dict[str, Any]:
    """pytest on every test file that marks tests ``cuda``, only those tests."""
    files = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if "mark.cuda" in p.read_text()
    )
    junit = work / "cuda-tests.xml"
    # Warnings are shown, not errors, here: this machine's packages are not the pinned ones.
    argv = [sys.executable, "-m", "pytest", "-m", "cuda", *files, "-q", "-p", "no:cacheprovider",
            "-W", "default", f"--junitxml={junit}"]
    proc = subprocess.run(argv, cwd=ROOT, timeout=420, check=False)
    without_conftest = proc.returncode in (2, 3, 4) or not junit.exists()
    if without_conftest:
        # Collection failed (interrupted, internal or usage error): most likely tests/conftest.py
        # imports a package this machine lacks. The cuda tests need none of its fixtures.
        print("gpu-check: pytest could not collect; again without tests/conftest.py", flush=True)
        proc = subprocess.run([*argv, "--noconftest"], cwd=ROOT, timeout=420, check=False)
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ok = proc.returncode == 0 and counts["tests"] > 0 and (counts["passed"] > 0 or sz.device == "cpu")
    return {"ok": ok, "files": files, "exit_code": proc.returncode, "without_conftest": without_conftest, **counts}


def bench(work: Path, sz: Sizes) -> dict[str, Any]:
    """bench/bench_train.py once per architecture, each in its own process."""
    runs: dict[str, Any] = {}
    for arch in sz.bench_archs:
        out = work / f"bench-{arch}.json"
        argv = [sys.executable, "bench/bench_train.py", "--arch", arch, *sz.bench, "--json", str(out)]
        proc = subprocess.run(argv, cwd=ROOT, timeout=300, check=False)
        if proc.returncode != 0:
            runs[arch] = {"ok": False, "exit_code": proc.returncode}
            continue
        result: dict[str, Any] = json.loads(out.read_text())
        keep = ("images_per_s", "ratio", "precision", "layout", "train_images", "epochs", "batch_size", "repeats",
                "seconds", "command")
        runs[arch] = {"ok": True, **{k: result[k] for k in keep}}
    return {"ok": all(r["ok"] for r in runs.values()), "runs": runs}


def _image_data(name: str, train: int, test: int, size: int, seed: int) -> Any:
    from app_engine.data.base import Dataset

    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (train + test, 3, size, size), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (train + test,), generator=gen)
    return Dataset.from_tensors(name, x[:train], y[:train], x[train:], y[train:], num_classes=10)


def app_protocol(work: Path, sz: Sizes) -> dict[str, Any]:
    """Time APP for ``app_epochs`` epochs per megabatch; extrapolate each megabatch to 50 epochs."""
    from app_common.events import MegabatchEnded
    from app_common.spec import JobSpec
    from app_engine.runner import run

    def spec(megabatches: int, epochs: int) -> JobSpec:
        return JobSpec.from_dict({
            "dataset": {"name": "synthetic"}, "architecture": sz.app_arch, "method": "app",
            "sparsity": {"target": 0.634}, "stream": {"megabatches": megabatches},
            "training": {"epochs": epochs, "batch_size": sz.app_batch, "augment": "crop_flip", "device": sz.device},
        })

    if sz.warmup_samples:
        # The CUDA context, cuDNN and the kernels of the shapes the timed run uses.
        warm = _image_data("warm-up", sz.warmup_samples, sz.warmup_samples // 4, sz.app_size, 1)
        run(spec(1, 1), work / "app-warm-up", data=warm)

    data = _image_data("cifar10-sized", sz.app_samples, sz.app_test, sz.app_size, 0)
    ends: list[float] = []

    def clock(event: object) -> None:
        if isinstance(event, MegabatchEnded):
            ends.append(time.perf_counter())

    t0 = time.perf_counter()
    outcome = run(spec(sz.app_megabatches, sz.app_epochs), work / "app", data=data, callbacks=[clock])
    total = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the serve step's worker is another process on the same GPU
    records = outcome.result["megabatches"]
    durations = [b - a for a, b in zip([t0, *ends[:-1]], ends, strict=True)]
    scale = PROTOCOL_EPOCHS / sz.app_epochs
    # Per megabatch: what does not depend on the epochs (pruning, measuring, the checkpoint) once,
    # the training (its per-epoch validation included) times 50 / epochs; the run's end once.
    per_megabatch = [
        max(0.0, d - m["train_time_s"]) + m["train_time_s"] * scale for d, m in zip(durations, records, strict=True)
    ]
    extrapolated = sum(per_megabatch) + (total - sum(durations))
    train_images = sum(m["images_per_s"] * m["train_time_s"] for m in records)
    peaks = [m.get("peak_gpu_memory_bytes") for m in records]
    return {
        "ok": not outcome.stopped,
        "architecture": sz.app_arch, "train_samples": sz.app_samples, "test_samples": sz.app_test,
        "image_size": sz.app_size, "megabatches": sz.app_megabatches, "epochs": sz.app_epochs,
        "batch_size": sz.app_batch, "device": outcome.result["device"], "precision": outcome.result["precision"],
        "seconds": total, "megabatch_seconds": durations,
        "train_images_per_s": train_images / max(sum(m["train_time_s"] for m in records), 1e-9),
        "protocol_epochs": PROTOCOL_EPOCHS, "protocol_seconds": extrapolated,
        "protocol_train_images": sum(m["train_samples"] for m in records) * PROTOCOL_EPOCHS,
        "peak_gpu_memory_bytes": max((p for p in peaks if p is not None), default=None),
        "final_density": outcome.result["final_density"],
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_job(work: Path, sz: Sizes) -> dict[str, Any]:
    """``anytime-prune serve --queue gpu`` in a scratch HOME; one job through the client."""
    from anytime_prune.client import Client

    home, log_path = work / "serve-home", work / "serve.log"
    env = {k: v for k, v in os.environ.items()
           if k != "REDIS_URL" and not k.startswith(("APP_", "ANYTIME_PRUNE_")) and k != "XDG_CONFIG_HOME"}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [
        str(ROOT), os.environ.get("PYTHONPATH")])))
    argv = [sys.executable, "-m", "anytime_prune.cli", "serve", "--queue", "gpu", "--port", str(_free_port()),
            "--state-dir", str(work / "serve-state"), "--artifacts-dir", str(work / "serve-artifacts"),
            "--startup-timeout", "180", "--stop-timeout", "10"]
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 200
        while b"Press Ctrl-C" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve did not start (exit {proc.poll()}):\n{_tail(log_path)}")
            time.sleep(0.25)
        started = time.perf_counter() - t0
        with Client.from_env(environ={"HOME": str(home)}) as client:
            job = client.submit(sz.serve_spec)
            t1 = time.perf_counter()
            final = client.wait(job["id"], timeout=sz.serve_timeout_s, poll_s=0.5)
            seconds = time.perf_counter() - t1
            files = client.download(job["id"], work / "serve-download") if final["status"] == "succeeded" else []
        result = final.get("result") or {}
        peaks = [m.get("peak_gpu_memory_bytes") for m in result.get("megabatches", [])]
        out = {
            "ok": final["status"] == "succeeded" and bool(files), "job": job["id"], "status": final["status"],
            "error": final.get("error"), "queue": final.get("queue"), "device": result.get("device"),
            "precision": result.get("precision"), "startup_seconds": started, "job_seconds": seconds,
            "final_test_accuracy": result.get("final_test_accuracy"), "files": sorted(p.name for p in files),
            "peak_gpu_memory_bytes": peaks,
        }
        if not out["ok"]:
            out["log_tail"] = _tail(log_path)
        return out
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C for serve (it stops its children), then the whole group by force if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- the report -------------------------------------------------------------------------------------


def environment(gpu: bool, install: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
        "cpu_count": os.cpu_count(), "gpu": None, "install": install,
    }
    if gpu:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported(),
                    cudnn=torch.backends.cudnn.version())  # type: ignore[no-untyped-call]  # untyped in torch
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=False)
            info["driver"] = smi.stdout.strip() or None
    return info


def goals(steps: dict[str, dict[str, Any]], dry_run: bool) -> list[dict[str, Any]]:
    """Issue 10's speed goals, each with its number and met / not met (none on a dry run)."""
    b18, app = steps.get("bench", {}).get("runs", {}).get("resnet18", {}), steps.get("app", {})
    engine = b18.get("images_per_s", {}).get("engine") if b18.get("ok") else None
    conventional = b18.get("images_per_s", {}).get("conventional") if b18.get("ok") else None
    protocol = app.get("protocol_seconds") if app.get("ok") else None
    ratio = None
    if protocol and conventional:
        ratio = app["protocol_train_images"] / conventional / protocol
        app["conventional_protocol_seconds"] = app["protocol_train_images"] / conventional
        app["protocol_ratio"] = ratio
    rows = [
        ("ResNet-18 32x32 training (engine, density 0.366, validation included)", engine, "images/s",
         f">= {GOAL_DENSE_IMAGES_S}", None if engine is None else engine >= GOAL_DENSE_IMAGES_S),
        ("full APP protocol, extrapolated", protocol, "s", f"<= {GOAL_PROTOCOL_S:.0f}",
         None if protocol is None else protocol <= GOAL_PROTOCOL_S),
        ("full APP protocol against the conventional loop", ratio, "x", f">= {GOAL_PROTOCOL_RATIO:.0f}",
         None if ratio is None else ratio >= GOAL_PROTOCOL_RATIO),
    ]
    return [{"goal": name, "value": value, "unit": unit, "target": target,
             "met": None if dry_run else met} for name, value, unit, target, met in rows]


def table(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    steps, rows = report["steps"], []
    env = report["environment"]
    rows.append(("machine", f"{env['gpu'] or 'no GPU (dry run on the CPU)'}, torch {env['torch']}, "
                 f"CUDA {env['cuda_build']}, Python {env['python']}; install: {env['install']}", ""))
    for name, step in steps.items():
        if name == "bench" and "runs" in step:
            for arch, b in step["runs"].items():
                if not b["ok"]:
                    rows.append((f"bench {arch}", f"FAILED: exit {b['exit_code']}", ""))
                    continue
                rate = b["images_per_s"]
                rows.append((f"bench {arch}", f"engine {rate['engine']:,.0f} images/s ({b['precision']['engine']}, "
                             f"{b['layout']['engine']}), conventional {rate['conventional']:,.0f}: {b['ratio']:.2f}x",
                             ""))
            rows[-1] = (*rows[-1][:2], f"{step['wall_s']:.0f} s")
            continue
        if not step.get("ok"):
            rows.append((name, f"FAILED: {step.get('error') or step.get('status') or step.get('exit_code')}",
                         f"{step.get('wall_s', 0):.0f} s"))
            continue
        if name == "cuda-tests":
            text = f"{step['passed']} passed, {step['skipped']} skipped, {step['failures'] + step['errors']} failed"
        elif name == "app":
            text = (f"{step['architecture']} N={step['megabatches']} x {step['epochs']} epochs on "
                    f"{step['train_samples']:,} images: {step['seconds']:.1f} s "
                    f"({step['train_images_per_s']:,.0f} images/s, {step['precision']}); "
                    f"{step['protocol_epochs']} epochs extrapolated: {step['protocol_seconds']:.0f} s")
            if step.get("protocol_ratio"):
                conventional = step["conventional_protocol_seconds"]
                text += f" ({step['protocol_ratio']:.1f}x the conventional loop's {conventional:.0f} s)"
            if step.get("peak_gpu_memory_bytes"):
                text += f"; peak GPU memory {step['peak_gpu_memory_bytes'] / 2**30:.2f} GiB"
        elif name == "serve":
            text = (f"job {step['status']} on queue {step['queue']}, device {step['device']}, "
                    f"{len(step['files'])} files downloaded; start {step['startup_seconds']:.0f} s, "
                    f"job {step['job_seconds']:.0f} s")
        else:
            text = "ok"
        rows.append((name, text, f"{step['wall_s']:.0f} s"))
    for g in report["goals"]:
        value = "-" if g["value"] is None else f"{g['value']:,.1f} {g['unit']}"
        verdict = {True: "met", False: "NOT met", None: "not judged"}[g["met"]]
        rows.append(("goal", f"{g['goal']}: {value} (goal {g['target']} {g['unit']}): {verdict}", ""))
    return rows


def print_table(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print()
    for name, text, wall in rows:
        print(f"{name:<{width}}  {text}" + (f"  [{wall}]" if wall else ""))


def default_out(gpu: bool) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu-check.json"
    return ROOT / "bench" / "results" / ("gpu-check.json" if gpu else "gpu-check-dry-run.json")


STEPS = ("cuda-tests", "bench", "app", "serve")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU even when there is a GPU")
    parser.add_argument("--out", type=Path, help="the JSON report (default: $OUT/gpu-check.json, else bench/results/)")
    parser.add_argument("--only", help=f"comma list of steps to run (default all: {','.join(STEPS)})")
    parser.add_argument("--app-epochs", type=int, default=2, help="epochs per megabatch of the timed APP run (GPU)")
    parser.add_argument("--install", help="how the dependencies were installed (gpu-check.sh fills it in)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu:
        why = "--dry-run" if torch.cuda.is_available() else "no CUDA device is available"
        print(f"gpu-check: {why}: a dry run of every step in tiny sizes on the CPU", flush=True)
    sz = sizes(gpu, args.app_epochs)
    wanted = STEPS if not args.only else tuple(s.strip() for s in args.only.split(","))
    unknown = set(wanted) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; known: {', '.join(STEPS)}")
    actions: dict[str, Callable[[Path, Sizes], dict[str, Any]]] = {
        "cuda-tests": cuda_tests,
        "bench": bench,
        "app": app_protocol,
        "serve": serve_job,
    }
    report: dict[str, Any] = {
        "dry_run": not gpu, "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": environment(gpu, args.install), "steps": {},
    }
    t_all = time.perf_counter()
    # A file still open in a step's folder (a server's log, say) must not cost the report.
    with tempfile.TemporaryDirectory(prefix="gpu-check-", ignore_cleanup_errors=True) as tmp:
        for name in wanted:
            print(f"\n=== gpu-check: {name} ===", flush=True)
            work = Path(tmp) / name
            work.mkdir()
            t0 = time.perf_counter()
            try:
                step = actions[name](work, sz)
            except Exception as exc:  # recorded; the other steps still run
                traceback.print_exc()
                step = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            step["wall_s"] = time.perf_counter() - t0
            report["steps"][name] = step
            print(f"=== gpu-check: {name} {'ok' if step['ok'] else 'FAILED'} in {step['wall_s']:.1f} s ===",
                  flush=True)
    report["wall_s"] = time.perf_counter() - t_all
    report["goals"] = goals(report["steps"], dry_run=not gpu)
    report["ok"] = all(step["ok"] for step in report["steps"].values())
    rows = table(report)
    report["table"] = [list(r) for r in rows]
    print_table(rows)
    out = args.out or default_out(gpu)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\ngpu-check: {'all steps ok' if report['ok'] else 'SOME STEPS FAILED'} in {report['wall_s']:.0f} s; "
          f"report in {out}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
