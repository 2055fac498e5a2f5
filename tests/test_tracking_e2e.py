"""MLflow tracking through the whole service: the API, a real Celery worker whose environment has
``MLFLOW_TRACKING_URI``, and a real ``mlflow server``; then a worker whose tracking server is down."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from mlflow_server import MlflowServer
from service_stack import ServiceStack, free_port, service_stack, stop_process
from test_tracking import SPEC, check_run_matches_job, mlflow_client

pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 600.0  # a hang guard: the job takes seconds


@pytest.fixture(scope="module")
def stack(
    redis_url: str, mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceStack]:
    folder = tmp_path_factory.mktemp("tracking-e2e")
    with service_stack(redis_url, folder, extra_env={"MLFLOW_TRACKING_URI": mlflow_server.url}) as running:
        yield running


def submit_and_wait(stack: ServiceStack, secret: str, body: dict[str, Any]) -> dict[str, Any]:
    with stack.client(secret) as client:
        job = client.submit(body)
        final = client.wait(job["id"], timeout=JOB_TIMEOUT_S, poll_s=0.3)
    assert final["status"] == "succeeded", (final.get("error"), stack.log_tail())
    return final


def test_job_is_tracked_and_linked(stack: ServiceStack, mlflow_server: MlflowServer) -> None:
    key_id, secret = stack.new_key("tracked")
    experiment = f"e2e-{uuid.uuid4().hex[:8]}"
    final = submit_and_wait(stack, secret, {**SPEC, "tracking": {"mlflow_experiment": experiment}})
    assert final["tracking"] == {"mlflow_experiment": experiment}
    run = check_run_matches_job(mlflow_client(mlflow_server), mlflow_server, stack.store, final["id"], key_id,
                                experiment)
    # What the API shows is the record's run.
    assert final["mlflow"] == {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                               "url": f"{mlflow_server.url}/#/experiments/{run.info.experiment_id}/runs/"
                                      f"{run.info.run_id}"}
    assert "warning" not in [e["type"] for _, e in stack.store.read_events(final["id"], count=10_000)]


def test_stopped_tracking_server_leaves_one_warning(stack: ServiceStack) -> None:
    """A worker whose tracking server is down (nothing listens on its port) still runs the job to
    success; the job's events carry one warning, which ``anytime-prune watch`` prints."""
    stop_process(stack.processes["worker"])
    stack.start("worker", "worker", "--queue", "cpu", "--hostname", f"{stack.prefix}@%h",
                extra_env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    _, secret = stack.new_key("untracked")
    final = submit_and_wait(stack, secret, SPEC)
    assert final["mlflow"] is None and final["result"] is not None
    warnings = [e for _, e in stack.store.read_events(final["id"], count=10_000) if e["type"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["source"] == "mlflow"
    watched = stack.cli("watch", final["id"], secret=secret)
    assert watched.returncode == 0, watched.stderr
    assert "warning (mlflow): MLflow tracking at http://127.0.0.1:" in watched.stderr
