"""worker/job.py: execute_job without Celery, against a real Redis and real engine runs on digits."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from worker_support import SPEC, events, sha256_of, spec_with, wait_for_event

from app_common.settings import Settings
from app_common.storage import artifact_key, job_prefix, models_index_key
from app_common.store import JobStore
from worker.job import OUTCOME_DUPLICATE, OUTCOME_SKIPPED, execute_job


def test_execute_job_runs_to_success(store: JobStore, settings: Settings) -> None:
    job = store.create_job("key_a", SPEC, queue="cpu")
    assert execute_job(job.id, store=store, settings=settings) == "succeeded"

    stream = events(store, job.id)
    assert [e["type"] for e in stream] == [
        "status_changed",
        "run_started",
        "pruned", "epoch_ended", "model_written", "checkpoint_written", "megabatch_ended",
        "pruned", "epoch_ended", "model_written", "checkpoint_written", "megabatch_ended",
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

    # Every listed artifact is in the store with the size and sha256 the record gives; the
    # work folder is gone, here and in the store (a finished job is never resumed).
    storage = settings.open_storage()
    names = {a.name for a in record.artifacts}
    assert {"model.safetensors", "masks.safetensors", "model.sparse.safetensors", "manifest.json"} <= names
    for artifact in record.artifacts:
        path = storage.local_path(artifact_key(job.id, artifact.name))
        assert path is not None and path.stat().st_size == artifact.bytes
        assert sha256_of(path) == artifact.sha256
        assert "path" not in artifact.model_dump()  # server paths stay on the server
    # Besides them: the model kept after each megabatch (its two files) and the index listing them.
    kept = [f"megabatch-{m:04d}/{f}" for m in (1, 2) for f in ("manifest.json", "model.sparse.safetensors")]
    assert [o.key for o in storage.list(job_prefix(job.id))] == sorted(
        [*(artifact_key(job.id, name) for name in [*names, *kept]), models_index_key(job.id)]
    )
    assert [m["index"] for m in result["megabatch_models"]] == [1, 2]
    assert not (settings.artifacts_dir / job.id).exists()
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


# Errors by kind: the engine is replaced by a run that raises.
def raising_run(exc: Exception) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return run


def test_run_input_error_fails_at_once(store: JobStore, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from app_engine import runner
    from app_engine.errors import RunInputError

    monkeypatch.setattr(runner, "run", raising_run(RunInputError("dataset 'npz': no such file x.npz")))
    job = store.create_job("key_a", SPEC, queue="cpu")
    assert execute_job(job.id, store=store, settings=settings) == "failed"
    record = store.get_job(job.id)
    assert record is not None
    assert record.error == "dataset 'npz': no such file x.npz" and record.attempt == 1
    assert [e.get("status") for e in events(store, job.id)] == ["running", "failed"]
    assert not store.lease_alive(job.id)


def test_other_errors_are_retried_until_the_attempt_cap(
    store: JobStore, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app_engine import runner

    monkeypatch.setattr(runner, "run", raising_run(OSError("disk full")))
    job = store.create_job("key_a", SPEC, queue="cpu")
    for attempt in range(1, settings.max_attempts):
        # Raised for Celery to retry; the job stays running and the lease is released for the next delivery.
        with pytest.raises(OSError, match="disk full"):
            execute_job(job.id, store=store, settings=settings)
        record = store.get_job(job.id)
        assert record is not None and record.status == "running" and record.attempt == attempt
        assert not store.lease_alive(job.id)
    assert execute_job(job.id, store=store, settings=settings) == "failed"
    record = store.get_job(job.id)
    assert record is not None
    assert record.error == "OSError: disk full" and record.attempt == settings.max_attempts
    running = [e["reason"] for e in events(store, job.id) if e.get("status") == "running"]
    assert running == [None, "attempt 2: resuming after a lost worker", "attempt 3: resuming after a lost worker"]
