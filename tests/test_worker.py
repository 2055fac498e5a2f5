"""The worker against a real Redis (see conftest.py) and real engine runs on the digits dataset.

The first tests call :func:`worker.job.execute_job` directly (no Celery): lifecycle, events,
histories, artifacts, lease, attempt cap, cancellation, user errors, the reaper. The ``slow``
tests start a real ``celery worker`` process: a job sent by name runs to the end, and a job whose
pool child is SIGKILLed mid-run is redelivered, resumes from its checkpoint and ends with the same
metrics as the uninterrupted run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from celery import Celery

from app_common.jobs import JobRecord
from app_common.settings import Settings
from app_common.store import JobStore, make_redis
from app_common.tasks import RUN_JOB_TASK
from worker.celery_app import make_celery
from worker.cli import run_worker, worker_argv
from worker.job import OUTCOME_DUPLICATE, OUTCOME_SKIPPED, execute_job
from worker.lease import CANCEL_FORCED, LEASE_LOST, LeaseHeartbeat
from worker.reaper import reap_orphans

REPO = Path(__file__).resolve().parents[1]

# Two megabatches of one epoch each: a complete APP run in about a second once torch is loaded.
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


@pytest.fixture
def settings(redis_url: str, key_prefix: str, tmp_path: Path) -> Settings:
    (tmp_path / "data").mkdir()
    # A 2 s lease: takeovers and the reaper act within seconds instead of half a minute.
    return Settings(
        redis_url=redis_url,
        redis_prefix=key_prefix,
        artifacts_dir=tmp_path / "artifacts",
        data_dir=tmp_path / "data",
        job_lease_ttl_s=2,
        # Celery's queues under the test's prefix too: isolated, and removed with its keys.
        celery_key_prefix=f"{key_prefix}:celery:",
    )


def events(store: JobStore, job_id: str) -> list[dict[str, Any]]:
    return [event for _, event in store.read_events(job_id, count=10_000)]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# execute_job without Celery


def test_execute_job_runs_to_success(store: JobStore, settings: Settings) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    assert execute_job(job.id, store=store, settings=settings) == "succeeded"

    stream = events(store, job.id)
    assert [e["type"] for e in stream] == [
        "status_changed",
        "run_started",
        "pruned", "epoch_ended", "checkpoint_written", "megabatch_ended",
        "pruned", "epoch_ended", "checkpoint_written", "megabatch_ended",
        "run_ended",
        "status_changed",
    ]
    assert [e["status"] for e in stream if e["type"] == "status_changed"] == ["running", "succeeded"]
    assert stream[1]["resumed_after"] == 0 and stream[1]["megabatches"] == 2
    assert [e["megabatch"] for e in stream if e["type"] == "megabatch_ended"] == [1, 2]
    # APP's schedule: density 0.8 after the first megabatch, the target 0.5 after the last.
    assert [round(e["density"], 3) for e in stream if e["type"] == "pruned"] == [0.8, 0.5]

    record = store.get_job(job.id)
    assert record is not None
    assert record.status == "succeeded" and record.error is None and record.attempt == 1
    assert record.started_at is not None and record.finished_at is not None
    assert record.progress.fraction == 1.0 and record.progress.megabatch == 2
    result = record.result
    assert result["status"] == "completed" and len(result["megabatches"]) == 2
    assert result["cer"] == sum(m["test_errors"] for m in result["megabatches"])
    assert result["final_test_accuracy"] > 0.5  # digits, 10 classes: far above chance
    assert abs(result["final_density"] - 0.5) < 0.01
    assert record.latest_metrics["test_accuracy"] == result["final_test_accuracy"]

    history = store.history(job.id)
    assert [m["index"] for m in history["megabatches"]] == [1, 2]
    for stored, produced in zip(history["megabatches"], result["megabatches"], strict=True):
        for key in ("test_accuracy", "test_errors", "density", "val_accuracy"):
            assert stored[key] == produced[key]
    assert [(e["megabatch"], e["epoch"]) for e in history["epochs"]] == [(1, 1), (2, 1)]

    # Every listed artifact is on disk with the size and sha256 the record gives.
    out_dir = settings.artifacts_dir / job.id
    names = {a.name for a in record.artifacts}
    assert {"model.safetensors", "masks.safetensors", "model.sparse.safetensors", "manifest.json"} <= names
    for artifact in record.artifacts:
        path = out_dir / artifact.name
        assert path.stat().st_size == artifact.bytes
        assert sha256_of(path) == artifact.sha256
        assert "path" not in artifact.model_dump()  # server paths stay on the server
    assert json.loads((out_dir / "result.json").read_text())["cer"] == result["cer"]
    assert not store.lease_alive(job.id)

    # A late redelivery of the finished job does nothing.
    assert execute_job(job.id, store=store, settings=settings) == OUTCOME_SKIPPED
    assert len(events(store, job.id)) == len(stream)


def test_duplicate_delivery_stands_down(store: JobStore, settings: Settings) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    assert store.acquire_lease(job.id, "other-worker", 60)
    before = store.get_job(job.id)
    started = time.monotonic()
    assert execute_job(job.id, store=store, settings=settings, lease_wait_s=0.5) == OUTCOME_DUPLICATE
    assert time.monotonic() - started >= 0.5
    assert store.get_job(job.id) == before  # status, attempt, timestamps untouched
    assert events(store, job.id) == []
    assert store.lease_alive(job.id)  # the other worker's lease is left alone


def test_lease_of_a_dead_worker_is_taken_over(store: JobStore, settings: Settings) -> None:
    # A worker died holding the lease (never renewed): the next delivery waits for it to expire
    # instead of standing down.
    job = store.create_job("key_a", SPEC, queue="cpu")
    assert store.acquire_lease(job.id, "dead-worker", 0.5)
    assert execute_job(job.id, store=store, settings=settings) == "succeeded"


def test_attempt_cap_fails_the_job(store: JobStore, settings: Settings) -> None:
    # Three deliveries took the job and died (status still running, lease expired).
    job = store.create_job("key_a", SPEC, queue="cpu")
    for _ in range(settings.max_attempts):
        store.next_attempt(job.id)
    assert store.transition(job.id, "running", allowed_from={"queued"})

    assert execute_job(job.id, store=store, settings=settings) == "failed"
    record = store.get_job(job.id)
    assert record is not None
    assert record.error == "worker died 3 times; giving up"
    assert record.attempt == 4
    assert [e["type"] for e in events(store, job.id)] == ["status_changed", "status_changed"]
    assert not (settings.artifacts_dir / job.id).exists()  # the engine never ran
    assert not store.lease_alive(job.id)


def wait_for_event(store: JobStore, job_id: str, kind: str, timeout_s: float = 60.0) -> None:
    after = "0-0"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = store.read_events(job_id, after=after, block_ms=200)
        if any(e["type"] == kind for _, e in batch):
            return
        after = batch[-1][0] if batch else after
    raise AssertionError(f"no {kind} event within {timeout_s} s")


def test_cancel_stops_the_run_within_one_epoch(store: JobStore, settings: Settings) -> None:
    job = store.create_job("key_a", spec_with(epochs=60), queue="cpu")
    outcome: list[str] = []
    runner = threading.Thread(target=lambda: outcome.append(execute_job(job.id, store=store, settings=settings)))
    runner.start()
    try:
        wait_for_event(store, job.id, "epoch_ended")
        assert store.request_cancel(job.id).status == "cancelling"  # type: ignore[union-attr]
    finally:
        runner.join(timeout=60)
    assert outcome == ["cancelled"]

    stream = events(store, job.id)
    statuses = [(e["status"], e["reason"]) for e in stream if e["type"] == "status_changed"]
    assert statuses == [("running", None), ("cancelling", "cancel requested"), ("cancelled", "cancelled by request")]
    cancel_at = next(i for i, e in enumerate(stream) if e.get("status") == "cancelling")
    # The sink reads the flag after every epoch: at most one more epoch ends after the request.
    assert sum(e["type"] == "epoch_ended" for e in stream[cancel_at:]) <= 1
    assert sum(e["type"] == "epoch_ended" for e in stream) < 60
    assert not any(e["type"] == "megabatch_ended" for e in stream)
    run_ended = [e for e in stream if e["type"] == "run_ended"]
    assert len(run_ended) == 1 and run_ended[0]["stopped"] is True
    record = store.get_job(job.id)
    assert record is not None and record.result is None and record.artifacts == []
    assert not store.lease_alive(job.id)


def test_run_that_lost_its_lease_leaves_the_job_alone(store: JobStore, settings: Settings) -> None:
    # Another worker took the job over (its lease is no longer ours): this run stops and writes
    # nothing more, neither events nor a status.
    job = store.create_job("key_a", spec_with(epochs=60), queue="cpu")
    outcome: list[str] = []
    runner = threading.Thread(target=lambda: outcome.append(execute_job(job.id, store=store, settings=settings)))
    runner.start()
    try:
        wait_for_event(store, job.id, "epoch_ended")
        store.redis.set(f"{store.prefix}:job:{job.id}:lease", "new-owner", px=60_000)
    finally:
        runner.join(timeout=60)
    assert outcome == ["lease_lost"]
    record = store.get_job(job.id)
    assert record is not None and record.status == "running" and record.result is None
    stream = events(store, job.id)
    assert [e["status"] for e in stream if e["type"] == "status_changed"] == ["running"]
    assert not any(e["type"] in ("run_ended", "megabatch_ended") for e in stream)
    assert store.redis.get(f"{store.prefix}:job:{job.id}:lease") == "new-owner"


def test_cancelled_job_of_a_dead_worker_is_finished_without_running(store: JobStore, settings: Settings) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    store.next_attempt(job.id)
    assert store.transition(job.id, "running", allowed_from={"queued"})
    store.request_cancel(job.id)  # -> cancelling; its worker is gone
    assert execute_job(job.id, store=store, settings=settings) == "cancelled"
    assert events(store, job.id)[-1]["reason"] == "cancelled by request"
    assert not (settings.artifacts_dir / job.id).exists()
    assert store.get_job(job.id).attempt == 1  # type: ignore[union-attr]


def test_missing_dataset_file_fails_with_its_name(store: JobStore, settings: Settings) -> None:
    spec = {**SPEC, "dataset": {"name": "npz", "path": "missing-digits.npz"}}
    job = store.create_job("key_a", spec, queue="cpu")
    assert execute_job(job.id, store=store, settings=settings) == "failed"
    record = store.get_job(job.id)
    assert record is not None
    # The worker applies the API's dataset path policy before the engine reads anything.
    assert record.error == "dataset.path 'missing-digits.npz' does not exist in the server's data folder"
    assert record.attempt == 1  # failed at once, no retry
    assert [e.get("status") for e in events(store, job.id)] == ["running", "failed"]


def test_dataset_path_outside_data_dir_is_refused(store: JobStore, settings: Settings, tmp_path: Path) -> None:
    outside = tmp_path / "secret.npz"
    outside.write_bytes(b"not for clients")
    (settings.data_dir / "link").symlink_to(tmp_path)
    for path, reason in [
        ("../secret.npz", "must not contain '..'"),
        (str(outside), "must be relative to the server's data folder"),
        ("link/secret.npz", "leads outside the server's data folder"),
    ]:
        job = store.create_job("key_a", {**SPEC, "dataset": {"name": "npz", "path": path}}, queue="cpu")
        assert execute_job(job.id, store=store, settings=settings) == "failed"
        error = store.get_job(job.id).error  # type: ignore[union-attr]
        assert error == f"dataset.path {reason}"


def test_invalid_spec_fails_with_the_field(store: JobStore, settings: Settings) -> None:
    job = store.create_job("key_a", {**SPEC, "architecture": "no-such-net"}, queue="cpu")
    assert execute_job(job.id, store=store, settings=settings) == "failed"
    assert store.get_job(job.id).error.startswith("architecture:")  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------
# Lease heartbeat


def test_heartbeat_keeps_the_lease_and_notices_a_takeover(store: JobStore) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    assert store.acquire_lease(job.id, "mine", 0.3)
    beat = LeaseHeartbeat(store, job.id, "mine", 0.3, cancel_grace_s=60.0)
    beat.start()
    try:
        time.sleep(1.0)  # three TTLs: only renewal keeps it alive
        assert store.lease_alive(job.id) and beat.interrupt_reason() is None
        store.release_lease(job.id, "mine")
        assert store.acquire_lease(job.id, "intruder", 30)
        beat.join(timeout=2)
        assert not beat.is_alive()
        assert beat.interrupt_reason() == LEASE_LOST
        assert store.redis.get(f"{store.prefix}:job:{job.id}:lease") == "intruder"
    finally:
        beat.stop()


def test_heartbeat_forces_cancel_after_grace_period(store: JobStore) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    assert store.transition(job.id, "running", allowed_from={"queued"})
    assert store.acquire_lease(job.id, "mine", 5)
    terminated = threading.Event()
    beat = LeaseHeartbeat(
        store, job.id, "mine", 5, cancel_grace_s=0.3, on_cancel_timeout=terminated.set, interval_s=0.1
    )
    beat.start()
    try:
        time.sleep(0.3)
        assert not terminated.is_set()  # no cancel asked: nothing happens
        store.request_cancel(job.id)
        asked = time.monotonic()
        assert terminated.wait(5)
        assert time.monotonic() - asked >= 0.3
        record = store.get_job(job.id)
        assert record is not None and record.status == "cancelled"
        assert beat.interrupt_reason() == CANCEL_FORCED
        assert events(store, job.id)[-1]["reason"] == "cancel grace period exceeded (0.3 s); run terminated"
    finally:
        beat.stop()


# --------------------------------------------------------------------------------------------------
# Reaper


def queued_tasks(client: redis.Redis, queue: str, job_ids: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """Messages for ``job_ids`` waiting in a Celery queue, as (raw entry, envelope).

    kombu's Redis transport keeps a queue as a list of JSON envelopes whose ``body`` is the
    base64 of ``[args, kwargs, embed]``.
    """
    found = []
    for raw in client.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        args = json.loads(base64.b64decode(envelope["body"]))[0]
        if args and args[0] in job_ids:
            found.append((str(raw), envelope))
    return found


def test_reaper_requeues_running_jobs_with_expired_leases(store: JobStore, settings: Settings) -> None:
    app = make_celery(settings)
    orphan = store.create_job("key_a", SPEC, queue="gpu")
    alive = store.create_job("key_a", SPEC, queue="gpu")
    queued = store.create_job("key_a", SPEC, queue="gpu")
    # Delivered once (attempt counted) but its worker died before marking it running.
    stuck = store.create_job("key_a", SPEC, queue="gpu")
    store.next_attempt(stuck.id)
    ids = {orphan.id, alive.id, queued.id, stuck.id}
    for job in (orphan, alive):
        store.next_attempt(job.id)
        assert store.transition(job.id, "running", allowed_from={"queued"})
    assert store.acquire_lease(alive.id, "live-worker", 60)
    gpu_queue = f"{settings.celery_key_prefix}gpu"
    try:
        assert sorted(reap_orphans(store, app, settings)) == sorted([orphan.id, stuck.id])
        sent = queued_tasks(store.redis, gpu_queue, ids)
        assert len(sent) == 2
        resent = set()
        for _, envelope in sent:
            assert envelope["headers"]["task"] == RUN_JOB_TASK
            args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
            assert kwargs == {}
            resent.add(args[0])
            assert envelope["properties"]["delivery_info"]["routing_key"] == "gpu"
        assert resent == {orphan.id, stuck.id}
        # Re-enqueued once per window, not at every pass of the reaper.
        assert reap_orphans(store, app, settings) == []
        assert len(queued_tasks(store.redis, gpu_queue, ids)) == 2
        assert store.get_job(queued.id).status == "queued"  # type: ignore[union-attr]
        assert store.get_job(orphan.id).status == "running"  # type: ignore[union-attr]
    finally:
        app.close()


# --------------------------------------------------------------------------------------------------
# The Celery application


def test_celery_config(settings: Settings) -> None:
    app = make_celery(settings)
    try:
        conf = app.conf
        assert conf.task_serializer == "json" and conf.result_serializer == "json"
        assert list(conf.accept_content) == ["json"]
        assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.task_ignore_result
        assert conf.worker_prefetch_multiplier == 1 and conf.worker_max_tasks_per_child == 1
        assert conf.broker_transport_options == settings.celery_transport_options()
        assert conf.broker_transport_options["visibility_timeout"] == settings.visibility_timeout_s
        assert conf.broker_transport_options["global_keyprefix"] == settings.celery_key_prefix
        assert conf.result_backend_transport_options["visibility_timeout"] == settings.visibility_timeout_s
        assert {q.name for q in conf.task_queues} == {"cpu", "gpu"} and conf.task_default_queue == "cpu"
        # Each queue on its own exchange and key: a job sent to one queue never lands in the other.
        assert all(q.exchange.name == q.routing_key == q.name for q in conf.task_queues)
        assert RUN_JOB_TASK in app.tasks
    finally:
        app.close()


def test_worker_needs_redis_and_a_known_queue(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown queue 'tpu'"):
        worker_argv("tpu")
    with pytest.raises(RuntimeError, match="REDIS_URL"):
        run_worker("cpu", Settings(redis_url=None, artifacts_dir=tmp_path))
    # The plain Celery command line refuses to start too, instead of retrying amqp://localhost.
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "APP_REDIS_URL")}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert "a worker needs REDIS_URL" in done.stderr


def test_importing_the_celery_app_does_not_import_torch() -> None:
    code = "import sys, worker.celery_app, worker.reaper, worker.cli; sys.exit('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------------------------------
# A real Celery worker process

# Three megabatches of 30 epochs: megabatches 2 and 3 train for seconds, a wide window for the kill.
LONG_SPEC = {**SPEC, "stream": {"megabatches": 3}, "training": {**SPEC["training"], "epochs": 30}}
JOB_TIMEOUT_S = 120.0


@dataclass
class CeleryWorker:
    process: subprocess.Popen[bytes]
    store: JobStore
    sender: Celery
    log_path: Path
    artifacts_dir: Path

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
    worker = CeleryWorker(process, store, sender, log_path, root / "artifacts")
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
        assert sha256_of(celery_worker.artifacts_dir / record.id / artifact.name) == artifact.sha256
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
           "APP_CELERY_KEY_PREFIX": f"{prefix}:celery:", "APP_ARTIFACTS_DIR": str(tmp_path / "artifacts")}
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
