"""api/main.py: the OpenAPI document, the imports and the lazy Redis connection of the app."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import redis
from api_support import PROBLEM, REPO, Api, closed_port

from api.main import create_app
from app_common import spec as S
from app_common.settings import Settings

pytestmark = pytest.mark.anyio


async def test_openapi_document(api: Api) -> None:
    doc = (await api.client.get("/openapi.json")).json()
    operation_ids = {op["operationId"] for item in doc["paths"].values() for op in item.values()}
    assert operation_ids == {
        "create_job", "list_jobs", "get_job", "cancel_job", "delete_job", "job_events", "job_metrics",
        "job_artifacts", "download_artifact", "catalog", "healthz", "readyz", "prometheus_metrics",
        "create_dataset", "upload_dataset_content", "complete_dataset_upload", "list_datasets", "get_dataset",
        "delete_dataset",
        "job_models", "best_job_model",
        "webhook_secret", "rotate_webhook_secret", "job_deliveries",
    }
    assert all(p.startswith("/api/v1/") or p in ("/healthz", "/readyz", "/metrics") for p in doc["paths"])
    create = doc["paths"]["/api/v1/jobs"]["post"]
    # The body is the job spec itself plus the service options (notify, tracking) beside its fields.
    assert create["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobCreate"}
    assert set(doc["components"]["schemas"]["JobCreate"]["properties"]) == set(S.JobSpec.model_fields) | {
        "notify", "tracking"}
    assert create["responses"]["422"]["content"] == {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert (await api.client.get("/docs")).status_code == 200


def test_api_imports_no_torch_numpy_engine_or_worker() -> None:
    code = (
        "import sys, api.main; "
        "bad = [m for m in ('torch', 'numpy', 'app_engine', 'worker') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_redis_server_is_not_needed_to_build_the_app() -> None:
    # create_app connects lazily: building it against a dead Redis must not block or fail.
    t0 = time.monotonic()
    app = create_app(Settings(redis_url=f"redis://127.0.0.1:{closed_port()}/0", signing_secret="s"))
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(redis.exceptions.ConnectionError):
        app.state.store.ping()
