"""API latency while training shares the machine (issue 11, item 9).

Starts ``anytime-prune serve`` (embedded Redis, one worker, the API) in a temporary folder, then
sends ``GET /api/v1/jobs/{id}`` at a fixed rate (open loop: a request leaves every 1/rate s
whether or not the previous ones were answered, so a slow server shows up as latency, not as a
politely lower rate) for ``--seconds`` in three phases measured in one run:

1. idle: no job training;
2. training: a long job trains on the worker;
3. training + competitor: the same, plus one CPU-bound process of equal priority competing for
   the cores (what happens on a shared, oversubscribed box).

Prints p50/p95/p99 latency and the achieved rate of each phase, and the goals (p99 <= 25 ms with
a job training on an otherwise idle machine, <= 250 ms with the competitor); ``--json`` writes the
numbers to a file.

    python bench/bench_api.py --rate 200 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
LONG_JOB: dict[str, Any] = {
    "dataset": {"name": "digits"}, "architecture": "cnn_small", "method": "app", "sparsity": {"target": 0.634},
    "stream": {"megabatches": 4}, "training": {"epochs": 200, "batch_size": 16},
}
GOALS_MS = {"training": 25.0, "training + competitor": 250.0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def load(url: str, key: str, rate: float, seconds: float) -> dict[str, float]:
    """Open-loop GETs at ``rate`` per second for ``seconds``; latencies in ms."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=30) as client:

        async def one() -> None:
            nonlocal errors
            start = time.perf_counter()
            try:
                response = await client.get(url)
                response.raise_for_status()
            except httpx.HTTPError:
                errors += 1
                return
            latencies.append(1000 * (time.perf_counter() - start))

        tasks = []
        begin = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - begin
    if not latencies:
        return {"requests": n, "errors": errors, "rate": 0.0}
    return {
        "requests": n, "errors": errors, "rate": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
    }


def burn() -> None:
    """One CPU-bound competitor (a busy loop), run as a separate process."""
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2**31


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker-nice", type=int, help="override serve's worker niceness (it uses 10)")
    parser.add_argument("--torch-threads", type=int, help="override serve's torch threads (it uses cores - 1)")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench-api-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("APP_")}
    env.update(HOME=str(folder), PYTHONUNBUFFERED="1")
    if args.worker_nice is not None:
        env["APP_WORKER_NICE"] = str(args.worker_nice)
    if args.torch_threads is not None:
        env["APP_TORCH_THREADS"] = str(args.torch_threads)
    serve = subprocess.Popen(
        [sys.executable, "-m", "anytime_prune.cli", "serve", "--port", str(port), "--state-dir", str(folder / "state"),
         "--artifacts-dir", str(folder / "artifacts"), "--log-level", "WARNING"],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    competitor: subprocess.Popen[bytes] | None = None
    try:
        assert serve.stdout is not None
        for line in serve.stdout:
            if line.startswith("Press Ctrl-C"):
                break
        else:
            raise SystemExit("serve did not start")
        creds = json.loads((folder / ".config" / "anytime-prune" / "credentials.json").read_text())
        base, key = f"http://127.0.0.1:{port}/api/v1", creds["api_key"]
        headers = {"Authorization": f"Bearer {key}"}
        job = httpx.post(f"{base}/jobs", json=dict(LONG_JOB, training={"epochs": 1}), headers=headers).json()
        deadline = time.monotonic() + 300
        while httpx.get(f"{base}/jobs/{job['id']}", headers=headers).json()["status"] != "succeeded":
            if time.monotonic() > deadline:
                raise SystemExit("the warm-up job did not finish")
            time.sleep(0.5)
        url = f"{base}/jobs/{job['id']}"
        results: dict[str, dict[str, float]] = {}
        results["idle"] = asyncio.run(load(url, key, args.rate, args.seconds))
        long_job = httpx.post(f"{base}/jobs", json=LONG_JOB, headers=headers).json()
        while httpx.get(f"{base}/jobs/{long_job['id']}", headers=headers).json()["progress"]["epoch"] < 1:
            time.sleep(0.2)  # training has started
        results["training"] = asyncio.run(load(url, key, args.rate, args.seconds))
        competitor = subprocess.Popen([sys.executable, "-c", "import bench_api; bench_api.burn()"],
                                      cwd=Path(__file__).parent)
        time.sleep(1.0)
        results["training + competitor"] = asyncio.run(load(url, key, args.rate, args.seconds))
        httpx.post(f"{base}/jobs/{long_job['id']}/cancel", headers=headers)
    finally:
        if competitor is not None:
            competitor.kill()
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
        if serve.stdout is not None:
            serve.stdout.close()

    share = f"worker nice {env.get('APP_WORKER_NICE', 'serve default 10')}, torch threads " \
        f"{env.get('APP_TORCH_THREADS', 'serve default cores-1')}"
    print(f"GET job at {args.rate:.0f} req/s for {args.seconds:.0f} s per phase ({os.cpu_count()} cores; {share})")
    print(f"{'phase':<24}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'rate/s':>9}{'errors':>8}  goal")
    for phase, r in results.items():
        goal = GOALS_MS.get(phase)
        met = goal is not None and r.get("p99_ms", 1e9) <= goal
        verdict = "" if goal is None else f"p99 <= {goal:.0f} ms: {'met' if met else 'NOT met'}"
        print(f"{phase:<24}{r.get('p50_ms', float('nan')):>9.1f}{r.get('p95_ms', float('nan')):>9.1f}"
              f"{r.get('p99_ms', float('nan')):>9.1f}{r['rate']:>9.1f}{r['errors']:>8.0f}  {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"rate": args.rate, "seconds": args.seconds, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
