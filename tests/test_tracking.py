"""worker/tracking.py: jobs as MLflow runs, against a real ``mlflow server`` (SQLite, local artifact
root) and real digits runs through ``execute_job`` (no Celery). tests/test_tracking_e2e.py runs a
fresh job through the whole service; here a job whose first delivery is lost mid-run is checked
the same way (its one run holds everything), and so is a job whose tracking server holds every
request until training is over (a real HTTP server in front of MLflow: tests/mlflow_server.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow_server import MlflowServer, gated_proxy
from service_stack import free_port

from anytime_prune.client import JobEvent
from anytime_prune.client_cli import EventProgress
from app_common.events import EpochEnded, RunEnded, RunStarted, WarningIssued, event_from_dict, event_to_dict
from app_common.jobs import MlflowRun, Tracking
from app_common.settings import Settings
from app_common.store import JobStore
from worker.job import execute_job
from worker.tracking import JobTracking, flatten_params, redact, run_url

HANG_GUARD_S = 300.0  # for what takes seconds

# Three megabatches of one epoch on digits: seconds on one CPU thread.
SPEC: dict[str, Any] = {
    "dataset": {"name": "digits"},
    "architecture": "mlp",
    "method": "app",
    "sparsity": {"target": 0.5},
    "stream": {"megabatches": 3},
    "training": {"epochs": 1, "batch_size": 64, "seed": 3, "precision": "fp32"},
}


def make_settings(tmp_path: Path, redis_url: str, key_prefix: str, tracking_uri: str | None,
                  public_url: str | None = None, **more: Any) -> Settings:
    (tmp_path / "data").mkdir(exist_ok=True)
    return Settings(
        redis_url=redis_url, redis_prefix=key_prefix, artifacts_dir=tmp_path / "artifacts",
        storage_dir=tmp_path / "storage", data_dir=tmp_path / "data", job_lease_ttl_s=2,
        celery_key_prefix=f"{key_prefix}:celery:", mlflow_tracking_uri=tracking_uri, mlflow_public_url=public_url,
        **more,
    )


def events(store: JobStore, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    return store.read_events(job_id, count=10_000)


def status_index(stream: list[tuple[str, dict[str, Any]]], status: str) -> int:
    """Where the job's move to ``status`` is in its event stream."""
    return next(i for i, (_, e) in enumerate(stream) if e["type"] == "status_changed" and e["status"] == status)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, f"no {what} in {HANG_GUARD_S:g} s"
        time.sleep(0.05)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mlflow_client(server: MlflowServer) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server.url)


def history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def check_run_matches_job(client: Any, server: MlflowServer, store: JobStore, job_id: str, owner: str,
                          experiment: str) -> Any:
    """The job's MLflow run holds what the job produced; returns the run."""
    record = store.get_job(job_id)
    assert record is not None and record.status == "succeeded" and record.mlflow is not None
    result = record.result
    assert result is not None
    run = client.get_run(record.mlflow.run_id)
    assert run.info.status == "FINISHED"
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None and run.info.experiment_id == exp.experiment_id == record.mlflow.experiment_id
    assert record.mlflow.url == f"{server.url}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
    assert run.data.tags["job_id"] == job_id and run.data.tags["api_key_id"] == owner
    assert run.info.run_name == job_id
    params = run.data.params
    assert params["dataset.name"] == "digits" and params["architecture"] == "mlp"
    assert params["stream.megabatches"] == "3" and params["training.epochs"] == "1"
    assert json.loads(params["export.formats"]) == result["config"]["export"]["formats"]

    # Per megabatch, step by step, exactly what result.json says.
    megabatches = result["megabatches"]
    for key in ("density", "test_accuracy", "val_accuracy", "train_accuracy", "target_density",
                "nonzero_params", "generalization_gap", "test_errors"):
        assert history(client, run.info.run_id, key) == [(m["index"], pytest.approx(m[key])) for m in megabatches], key
    cer = [sum(m["test_errors"] for m in megabatches[:i]) for i in range(1, len(megabatches) + 1)]
    assert history(client, run.info.run_id, "cer") == [(i, c) for i, c in enumerate(cer, start=1)]
    assert cer[-1] == result["cer"]
    # Per epoch, one global step per epoch across megabatches.
    epochs = [e for m in megabatches for e in m["epochs"]]
    losses = history(client, run.info.run_id, "epoch/train_loss")
    assert losses == [(i, pytest.approx(e["train_loss"])) for i, e in enumerate(epochs, start=1)]
    # The final per-layer density.
    last = megabatches[-1]
    for name, density in last["layer_density"].items():
        assert history(client, run.info.run_id, f"layer_density/{name}") == [(last["index"], pytest.approx(density))]

    # The files: each one's sha256 equals the manifest's (and the job's artifact list).
    listed = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"model.sparse.safetensors", "manifest.json", "report.png", "result.json"} <= listed
    # Downloaded through the server's artifact proxy (httpx: MLflow's own download leaves sockets open).
    assert run.info.artifact_uri == f"mlflow-artifacts:/{exp.experiment_id}/{run.info.run_id}/artifacts"
    base = f"{server.url}/api/2.0/mlflow-artifacts/artifacts/{exp.experiment_id}/{run.info.run_id}/artifacts"
    with httpx.Client(timeout=30.0) as http:
        files = {name: http.get(f"{base}/{name}").raise_for_status().content
                 for name in ("model.sparse.safetensors", "report.png", "manifest.json")}
    in_manifest = {f["name"]: f["sha256"] for f in json.loads(files["manifest.json"])["files"]}
    in_record = {a.name: a.sha256 for a in record.artifacts}
    for name, data in files.items():
        assert sha256(data) == in_record[name], name
        if name != "manifest.json":
            assert sha256(data) == in_manifest[name], name
    return run


def test_flatten_params() -> None:
    spec = {"a": {"b": 1, "c": {"d": None}}, "e": "text", "f": [1, 2], "g": {}, "h": True}
    assert dict(flatten_params(spec)) == {"a.b": "1", "a.c.d": "null", "e": "text", "f": "[1, 2]", "g": "{}",
                                          "h": "true"}


def test_run_url_and_redaction() -> None:
    assert run_url("http://u:secret@mlflow:5000/", "3", "abc") == "http://mlflow:5000/#/experiments/3/runs/abc"
    assert run_url("databricks", "3", "abc") is None and run_url(None, "3", "abc") is None
    assert redact("https://mlflow.example/x") == "https://mlflow.example/x"
    assert "secret" not in redact("https://user:secret@[::1]:8443/x")


def test_warning_event_round_trips_and_is_printed(caplog: pytest.LogCaptureFixture) -> None:
    event = WarningIssued(source="mlflow", message="gone")
    assert event_from_dict({"type": "warning", "source": "mlflow", "message": "gone"}) == event
    progress = EventProgress("[j] ")  # what `anytime-prune watch` shows
    with caplog.at_level(logging.INFO, logger="anytime_prune"):
        progress(JobEvent("1-0", "warning", event_to_dict(event)))
    assert caplog.messages == ["[j] warning (mlflow): gone"]


def crash_at(kind: str, megabatch: int) -> Callable[..., Any]:
    """The engine's run, with a last callback that raises (a lost worker, as Celery sees it) at
    the ``kind`` event of ``megabatch``."""
    from app_engine import runner

    real = runner.run

    def run(*args: Any, callbacks: Any = (), **kwargs: Any) -> Any:
        def crash(event: Any) -> None:
            if event.type == kind and event.megabatch == megabatch:
                raise OSError("worker lost")

        return real(*args, callbacks=[*callbacks, crash], **kwargs)

    return run


def test_retried_job_continues_its_run(
    mlflow_server: MlflowServer, store: JobStore, redis_url: str, key_prefix: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A delivery lost after megabatch 2 was checkpointed but before it was logged: the retry
    continues the same run, logs megabatch 3, then fills in megabatch 2 and the CER."""
    from app_engine import runner

    settings = make_settings(tmp_path, redis_url, key_prefix, mlflow_server.url)
    experiment = f"test-{uuid.uuid4().hex[:8]}"
    job = store.create_job("key_retry", SPEC, queue="cpu", tracking=Tracking(mlflow_experiment=experiment))
    with monkeypatch.context() as patch:
        patch.setattr(runner, "run", crash_at("checkpoint_written", 2))
        with pytest.raises(OSError, match="worker lost"):
            execute_job(job.id, store=store, settings=settings)
    first = store.get_job(job.id)
    assert first is not None and first.status == "running" and first.mlflow is not None
    client = mlflow_client(mlflow_server)
    assert client.get_run(first.mlflow.run_id).info.status == "RUNNING"
    assert history(client, first.mlflow.run_id, "test_accuracy")[0][0] == 1

    assert execute_job(job.id, store=store, settings=settings) == "succeeded"
    record = store.get_job(job.id)
    assert record is not None and record.mlflow == first.mlflow and record.attempt == 2
    run = check_run_matches_job(client, mlflow_server, store, job.id, "key_retry", experiment)
    assert run.info.run_id == first.mlflow.run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_unreachable_server_costs_one_warning(
    store: JobStore, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """A tracking URI where nothing listens: the job succeeds untracked, with one warning event
    between run_started and the job's success (the engine's thread never called the server: the
    sender's error is reported from the next event, or at the end; entry ids are Redis's
    millisecond clock: the failure cost seconds)."""
    uri = f"http://127.0.0.1:{free_port()}"
    settings = make_settings(tmp_path, redis_url, key_prefix, uri)
    job = store.create_job("key_down", SPEC, queue="cpu")
    started = time.monotonic()
    assert execute_job(job.id, store=store, settings=settings) == "succeeded"
    elapsed = time.monotonic() - started
    stream = events(store, job.id)
    kinds = [e["type"] for _, e in stream]
    assert kinds.count("warning") == 1
    assert kinds.index("run_started") < kinds.index("warning") < status_index(stream, "succeeded")
    entry_id, warning = stream[kinds.index("warning")]
    assert warning["source"] == "mlflow" and uri in warning["message"] and "stopped" in warning["message"]
    cost_s = (int(entry_id.split("-")[0]) - int(stream[kinds.index("run_started")][0].split("-")[0])) / 1000
    print(f"unreachable tracking server: the warning came {cost_s:.1f} s after run_started; job {elapsed:.1f} s")
    # A hang guard, 10x the few seconds expected: MLflow's own defaults take minutes.
    assert cost_s < 60
    record = store.get_job(job.id)
    assert record is not None and record.mlflow is None and record.result is not None


def test_slow_server_does_not_hold_training(
    mlflow_server: MlflowServer, store: JobStore, redis_url: str, key_prefix: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tracking server holds every request until the run is over: all three megabatches are
    trained and the run ends while it has answered nothing; the queue (two updates here) overflows,
    which one warning says. Once it answers, the job's end waits for its run: the run holds
    everything (what was dropped, from result.json) and is FINISHED before the job succeeds."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")  # the held request must not time out
    experiment = f"test-{uuid.uuid4().hex[:8]}"
    job = store.create_job("key_slow", SPEC, queue="cpu", tracking=Tracking(mlflow_experiment=experiment))
    outcome: list[str] = []
    with gated_proxy(mlflow_server.url) as proxy:
        settings = make_settings(tmp_path, redis_url, key_prefix, proxy.url, public_url=mlflow_server.url,
                                 mlflow_queue_limit=2)
        worker = threading.Thread(target=lambda: outcome.append(execute_job(job.id, store=store, settings=settings)))
        worker.start()
        wait_until(lambda: "run_ended" in [e["type"] for _, e in events(store, job.id)], "run_ended")
        kinds = [e["type"] for _, e in events(store, job.id)]
        assert kinds.count("megabatch_ended") == 3 and proxy.first_request.is_set() and proxy.answered == 0
        record = store.get_job(job.id)
        assert record is not None and record.status == "running" and record.mlflow is None  # waiting for MLflow
        proxy.open()
        worker.join(HANG_GUARD_S)
        assert not worker.is_alive() and outcome == ["succeeded"]
        assert proxy.answered == proxy.received
    run = check_run_matches_job(mlflow_client(mlflow_server), mlflow_server, store, job.id, "key_slow", experiment)
    stream = events(store, job.id)
    kinds = [e["type"] for _, e in stream]
    succeeded = status_index(stream, "succeeded")
    # FINISHED (the client's clock) before the job's success (Redis's clock, the same machine's, in ms).
    assert run.info.end_time <= int(stream[succeeded][0].split("-")[0])
    assert kinds.count("warning") == 1
    warning = stream[kinds.index("warning")][1]
    assert warning["source"] == "mlflow" and "slower than training" in warning["message"]
    assert kinds.index("run_started") < kinds.index("warning") < kinds.index("run_ended")


def test_dead_server_is_one_warning_at_the_end(
    mlflow_server: MlflowServer, store: JobStore, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """A server that takes the connection and never answers: every callback returns while the
    first request hangs; the end waits its bound (1 s here), says so once, and the abandoned
    sender makes no other request when the held one finally goes through."""
    with gated_proxy(mlflow_server.url) as proxy:
        settings = make_settings(tmp_path, redis_url, key_prefix, proxy.url, mlflow_drain_timeout_s=1.0)
        record = store.create_job("key_dead", SPEC, queue="cpu", tracking=Tracking(mlflow_experiment="dead"))
        tracking = JobTracking(record, settings=settings, store=store, out_dir=tmp_path / record.id)
        tracking_warnings: list[Any] = []
        tracking.warn = tracking_warnings.append
        tracking(RunStarted(megabatches=3, epochs=2))
        assert proxy.first_request.wait(HANG_GUARD_S)
        for epoch in (1, 2):
            tracking(EpochEnded(megabatch=1, epoch=epoch, epochs=2, lr=0.1, train_loss=1.0, train_accuracy=0.5,
                                val_accuracy=0.5))
        assert proxy.received == 1 and proxy.answered == 0  # the callbacks did not wait for it
        tracking.end("succeeded")
        assert tracking.failed and tracking.run is None and not tracking_warnings  # the run is over: the store
        warnings = [e for _, e in events(store, record.id) if e["type"] == "warning"]
        assert len(warnings) == 1 and "within 1 s of the job's end" in warnings[0]["message"]
        assert proxy.answered == 0
        proxy.open()
        wait_until(lambda: proxy.answered == 1, "answer")
        assert tracking.join_sender(HANG_GUARD_S)
        assert proxy.received == 1
    stored = store.get_job(record.id)
    assert stored is not None and stored.mlflow is None


def test_store_records_the_run(store: JobStore) -> None:
    job = store.create_job("key_rec", SPEC, queue="cpu")
    run = MlflowRun(run_id="r" * 32, experiment_id="7", url="http://mlflow/#/experiments/7/runs/" + "r" * 32)
    assert store.set_mlflow_run(job.id, run)
    record = store.get_job(job.id)
    assert record is not None and record.mlflow == run
    assert store.delete_job(job.id)
    assert not store.set_mlflow_run(job.id, run)  # never recreates a deleted job
    assert store.get_job(job.id) is None


def tracking_for(store: JobStore, settings: Settings, tmp_path: Path, experiment: str) -> tuple[JobTracking, list[Any]]:
    """A job's tracking fed by hand (no training); its warnings collected in a list."""
    record = store.create_job("key_hand", SPEC, queue="cpu", tracking=Tracking(mlflow_experiment=experiment))
    tracking = JobTracking(record, settings=settings, store=store, out_dir=tmp_path / record.id)
    warnings: list[Any] = []
    tracking.warn = warnings.append
    return tracking, warnings


@pytest.mark.parametrize(("outcome", "status"), [("cancelled", "KILLED"), ("failed", "FAILED"),
                                                 ("lease_lost", "RUNNING")])
def test_run_ends_as_the_job(
    mlflow_server: MlflowServer, store: JobStore, redis_url: str, key_prefix: str, tmp_path: Path, outcome: str,
    status: str,
) -> None:
    settings = make_settings(tmp_path, redis_url, key_prefix, mlflow_server.url)
    tracking, warnings = tracking_for(store, settings, tmp_path, f"test-{uuid.uuid4().hex[:8]}")
    tracking(RunStarted(megabatches=3, epochs=1))
    tracking.end(outcome)
    assert tracking.run is not None and not warnings
    assert mlflow_client(mlflow_server).get_run(tracking.run.run_id).info.status == status
    record = store.get_job(tracking.job_id)
    assert record is not None and record.mlflow == tracking.run


def test_deleted_experiment_is_one_warning(
    mlflow_server: MlflowServer, store: JobStore, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    client = mlflow_client(mlflow_server)
    experiment = f"test-{uuid.uuid4().hex[:8]}"
    client.delete_experiment(client.create_experiment(experiment))
    settings = make_settings(tmp_path, redis_url, key_prefix, mlflow_server.url)
    tracking, warnings = tracking_for(store, settings, tmp_path, experiment)
    tracking(RunStarted(megabatches=3, epochs=1))
    tracking(RunEnded(cer=1, final_test_accuracy=0.9, final_density=0.5))  # after the error: nothing more is tried
    tracking.end("succeeded")
    # Reported from an event's callback (the sink) or, once the run ended, to the store.
    stored = [WarningIssued(e["source"], e["message"]) for _, e in events(store, tracking.job_id)
              if e["type"] == "warning"]
    assert [(w.source, "is deleted" in w.message) for w in warnings + stored] == [("mlflow", True)]
    assert tracking.failed and tracking.run is None


def test_job_given_up_fails_its_run(
    mlflow_server: MlflowServer, store: JobStore, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """Its workers died max_attempts times: the job fails without running, and so does the run
    the first delivery opened."""
    settings = make_settings(tmp_path, redis_url, key_prefix, mlflow_server.url)
    tracking, _ = tracking_for(store, settings, tmp_path, f"test-{uuid.uuid4().hex[:8]}")
    tracking(RunStarted(megabatches=3, epochs=1))
    tracking.close()  # the first delivery's worker dies: what it queued reached MLflow
    assert tracking.run is not None
    for _ in range(settings.max_attempts):
        store.next_attempt(tracking.job_id)
    assert execute_job(tracking.job_id, store=store, settings=settings) == "failed"
    assert mlflow_client(mlflow_server).get_run(tracking.run.run_id).info.status == "FAILED"
