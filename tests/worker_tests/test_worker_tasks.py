"""worker/tasks.py through a real celery worker process: a job sent by name runs to the end; a job whose
pool child is SIGKILLed mid-run is redelivered, resumes from its checkpoint and ends with the same metrics
as the uninterrupted run; ``python -m worker`` starts and stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from celery import Celery
from worker_support import REPO, SPEC, events, sha256_of

from app_common.jobs import JobRecord
from app_common.settings import Settings
from app_common.storage import LocalStorage, artifact_key
from app_common.store import JobStore, make_redis
from app_common.tasks import RUN_JOB_TASK

LONG_SPEC = {**SPEC, "stream": {"megabatches": 3}, "training": {**SPEC["training"], "epochs": 30}}


JOB_TIMEOUT_S = 120.0


@dataclass
class CeleryWorker:
    process: subprocess.Popen[bytes]
    store: JobStore
    sender: Celery
    log_path: Path
    storage: LocalStorage

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def submit(self, spec: dict[str, Any]) -> str:
        """What the API does: write the record, then send the task by name."""
        job = self.store.create_job("key_a", spec, queue="cpu")
        self.sender.send_task(RUN_JOB_TASK, args=[job.id], queue="cpu")
        return str(job.id)

    def wait_terminal(self, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> JobRecord:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            record = self.store.get_job(job_id)
            if record is not None and record.status in ("succeeded", "failed", "cancelled"):
                return record
            assert self.process.poll() is None, f"the worker exited:\n{self.log_tail()}"
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not finish in {timeout_s} s:\n{self.log_tail()}")


@pytest.fixture(scope="module")
def celery_worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryWorker]:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    settings = Settings(redis_url=redis_url, redis_prefix=prefix, celery_key_prefix=f"{prefix}:celery:")
    root = tmp_path_factory.mktemp("celery-worker")
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "APP_REDIS_PREFIX": prefix,
        "APP_CELERY_KEY_PREFIX": settings.celery_key_prefix,
        "APP_ARTIFACTS_DIR": str(root / "artifacts"),
        "APP_STORAGE_DIR": str(root / "storage"),
        "APP_DATA_DIR": str(root / "data"),
        "APP_JOB_LEASE_TTL_S": "2",
        "OMP_NUM_THREADS": "1",
    }
    log_path = root / "worker.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                "-Q", "cpu", "-c", "1", "--prefetch-multiplier", "1", "-O", "fair", "--max-tasks-per-child", "1",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
                "--loglevel", "INFO", "--hostname", f"{prefix}@%h",
            ],
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    store = JobStore(make_redis(redis_url, timeout_s=5.0), prefix=prefix)
    # The API's side: a bare Celery app that knows only the broker and its transport options.
    sender = Celery("test-api", broker=redis_url, set_as_current=False)
    sender.conf.broker_transport_options = settings.celery_transport_options()
    worker = CeleryWorker(process, store, sender, log_path, LocalStorage(root / "storage"))
    try:
        deadline = time.monotonic() + 60
        while " ready." not in log_path.read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, f"no worker:\n{worker.log_tail()}"
            time.sleep(0.1)
        yield worker
    finally:
        pool = psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []
        process.send_signal(signal.SIGTERM)  # warm shutdown: stops the pool, puts unacked messages back
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        for child in pool:
            if child.is_running():
                child.kill()
        sender.close()
        # The jobs' keys and Celery's (queues, bindings, unacked messages) share the prefix.
        for key in store.redis.scan_iter(match=f"{prefix}:*"):
            store.redis.delete(key)
        store.redis.close()


@pytest.fixture(scope="module")
def reference_run(celery_worker: CeleryWorker) -> JobRecord:
    """LONG_SPEC run through the worker without interruption."""
    job_id = celery_worker.submit(LONG_SPEC)
    return celery_worker.wait_terminal(job_id)


@pytest.mark.slow
def test_celery_worker_runs_a_job_sent_by_name(celery_worker: CeleryWorker, reference_run: JobRecord) -> None:
    record = reference_run
    assert record.status == "succeeded", celery_worker.log_tail()
    assert record.attempt == 1 and record.error is None
    assert len(record.result["megabatches"]) == 3
    stream = events(celery_worker.store, record.id)
    assert [e["megabatch"] for e in stream if e["type"] == "megabatch_ended"] == [1, 2, 3]
    assert sum(e["type"] == "epoch_ended" for e in stream) == 90
    for artifact in record.artifacts:
        stored = celery_worker.storage.local_path(artifact_key(record.id, artifact.name))
        assert stored is not None and sha256_of(stored) == artifact.sha256
    assert "reaper started" in celery_worker.log_path.read_text()  # worker_ready hook ran in the parent


@pytest.mark.slow
def test_killed_pool_child_is_redelivered_and_resumes(
    celery_worker: CeleryWorker, reference_run: JobRecord
) -> None:
    store = celery_worker.store
    job_id = celery_worker.submit(LONG_SPEC)
    killed: list[int] = []
    after = "0-0"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not killed and time.monotonic() < deadline:
        for entry_id, event in store.read_events(job_id, after=after, block_ms=200):
            after = entry_id
            if event["type"] == "megabatch_ended" and event["megabatch"] == 1:
                # The pool child runs the job; its parent (the worker) stays up.
                children = psutil.Process(celery_worker.process.pid).children()
                assert len(children) == 1, celery_worker.log_tail()
                children[0].send_signal(signal.SIGKILL)
                killed.append(children[0].pid)
                break
    assert killed, f"megabatch 1 never ended:\n{celery_worker.log_tail()}"

    record = celery_worker.wait_terminal(job_id)
    assert record.status == "succeeded", celery_worker.log_tail()
    assert record.attempt == 2
    stream = events(store, job_id)
    starts = [e for e in stream if e["type"] == "run_started"]
    assert [s["resumed_after"] for s in starts][0] == 0
    assert len(starts) == 2 and starts[1]["resumed_after"] >= 1
    assert [e["megabatch"] for e in stream if e["type"] == "megabatch_ended"] == [1, 2, 3]
    running = [e["reason"] for e in stream if e.get("status") == "running"]
    assert running == [None, "attempt 2: resuming after a lost worker"]
    assert all(p.pid != killed[0] for p in psutil.Process(celery_worker.process.pid).children())

    # Resuming from the checkpoint gives exactly the uninterrupted run's metrics.
    keys = ("test_accuracy", "density", "test_errors", "val_accuracy", "train_loss")
    resumed = [{k: m[k] for k in keys} for m in store.history(job_id)["megabatches"]]
    reference = [{k: m[k] for k in keys} for m in store.history(reference_run.id)["megabatches"]]
    assert resumed == reference
    assert record.result["cer"] == reference_run.result["cer"]


@pytest.mark.slow
def test_python_m_worker_starts_and_stops(redis_url: str, tmp_path: Path) -> None:
    """``python -m worker --queue gpu`` (run_worker) consumes the gpu queue and shuts down cleanly."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    env = {**os.environ, "REDIS_URL": redis_url, "APP_QUEUES": "cpu,gpu", "APP_REDIS_PREFIX": prefix,
           "APP_CELERY_KEY_PREFIX": f"{prefix}:celery:", "APP_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
           "APP_STORAGE_DIR": str(tmp_path / "storage")}
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "--queue", "gpu", "--hostname", f"gpu-{uuid.uuid4().hex[:6]}@%h"],
            cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while " ready." not in log_path.read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        text = log_path.read_text()
        assert "concurrency: 1 (prefork)" in text
        assert ".> gpu" in text and ".> cpu" not in text
        assert "reaper started" in text
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
        client = make_redis(redis_url)
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
        client.close()
    assert code == 0
