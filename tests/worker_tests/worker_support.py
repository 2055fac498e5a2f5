"""What the worker tests share: a small job spec and readers of a job's events."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from app_common.store import JobStore

REPO = Path(__file__).resolve().parents[2]


SPEC: dict[str, Any] = {
    "dataset": {"name": "digits"},
    "architecture": "mlp",
    "method": "app",
    "sparsity": {"target": 0.5},
    "stream": {"megabatches": 2},
    "training": {"epochs": 1, "batch_size": 64, "seed": 3},
}


def spec_with(**training: Any) -> dict[str, Any]:
    return {**SPEC, "training": {**SPEC["training"], **training}}


def events(store: JobStore, job_id: str) -> list[dict[str, Any]]:
    return [event for _, event in store.read_events(job_id, count=10_000)]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_for_event(store: JobStore, job_id: str, kind: str, timeout_s: float = 60.0) -> None:
    after = "0-0"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = store.read_events(job_id, after=after, block_ms=200)
        if any(e["type"] == kind for _, e in batch):
            return
        after = batch[-1][0] if batch else after
    raise AssertionError(f"no {kind} event within {timeout_s} s")
