"""MLflow tracking through the whole service: the API, a real Celery worker whose environment has
``MLFLOW_TRACKING_URI``, and a real ``mlflow server``. (An unreachable server, a retried job and
the mapping's details: tests/test_tracking.py.)"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from mlflow_server import MlflowServer
from service_stack import ServiceStack, service_stack
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
