"""The service options beside the spec (notify, tracking) and the public record built in app_common."""

from __future__ import annotations

from typing import Any

import pytest
from api_support import SMALL, Api, assert_problem

from api.main import create_app
from app_common.jobs import JobRecord
from app_common.public import JobUrls, public_job
from app_common.settings import Settings
from app_common.spec import JobSpec

pytestmark = pytest.mark.anyio

NOTIFY = {"url": "http://127.0.0.1:9/hook", "events": ["started", "completed"]}


def test_every_link_template_is_the_route_it_names(settings: Settings) -> None:
    app = create_app(settings)
    try:
        routes = {"self": "get_job", "events": "job_events", "metrics": "job_metrics",
                  "artifacts": "job_artifacts", "models": "job_models", "cancel": "cancel_job"}
        assert set(routes) == set(JobUrls.model_fields)
        urls = JobUrls.for_job("0123abcd")
        for field, route in routes.items():
            assert getattr(urls, field) == app.url_path_for(route, job_id="0123abcd"), field
    finally:
        app.state.store.close()
        app.state.celery.close()


async def test_options_are_stored_beside_the_spec_not_in_it(api: Api) -> None:
    body = {**SMALL, "notify": NOTIFY, "tracking": {"mlflow_experiment": "sweeps"}}
    job = await api.submit(body)
    assert job["notify"] == NOTIFY
    assert job["tracking"] == {"mlflow_experiment": "sweeps"}
    assert job["mlflow"] is None
    # The engine's spec (and so its fingerprint: resume, idempotency) is the body without them.
    assert "notify" not in job["spec"] and "tracking" not in job["spec"]
    assert job["spec"] == JobSpec.from_dict(SMALL).to_dict()
    stored = api.store.get_job(job["id"])
    assert stored is not None and stored.notify is not None and stored.notify.url == NOTIFY["url"]
    # The document the API serves is the one app_common builds (the webhooks' data).
    r = await api.client.get(job["urls"]["self"], headers=api.a)
    assert r.json() == public_job(stored) == job


async def test_defaults_and_absent_options(api: Api) -> None:
    job = await api.submit({**SMALL, "notify": {"url": "https://example.org/x"}, "tracking": {}})
    assert job["notify"]["events"] == ["completed"]
    assert job["tracking"] == {"mlflow_experiment": "anytime-prune"}
    plain = await api.submit(SMALL)
    assert plain["notify"] is None and plain["tracking"] is None


async def test_same_spec_with_other_options_replays_the_idempotent_answer(api: Api) -> None:
    headers = {**api.a, "Idempotency-Key": "opts-1"}
    first = await api.client.post("/api/v1/jobs", json={**SMALL, "notify": NOTIFY}, headers=headers)
    again = await api.client.post("/api/v1/jobs", json=SMALL, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.headers.get("idempotent-replayed") == "true" and again.json()["id"] == first.json()["id"]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"notify": {"url": "ftp://example.org/x"}}, "notify.url"),
        ({"notify": {"url": "http://"}}, "notify.url"),
        ({"notify": {"url": "http://user:pw@example.org/"}}, "notify.url"),
        ({"notify": {"url": "http://example.org:99999/"}}, "notify.url"),
        ({"notify": {"url": "http://exa mple.org/"}}, "notify.url"),
        ({"notify": {"url": "http://example.org/", "events": ["finished"]}}, "notify.events.0"),
        ({"notify": {"url": "http://example.org/", "events": []}}, "notify.events"),
        ({"notify": {"url": "http://example.org/", "events": ["completed", "completed"]}}, "notify.events"),
        ({"notify": {"url": "http://example.org/", "secret": "x"}}, "notify.secret"),
        ({"notify": "http://example.org/"}, "notify"),
        ({"tracking": {"mlflow_experiment": ""}}, "tracking.mlflow_experiment"),
        ({"tracking": {"experiment": "x"}}, "tracking.experiment"),
    ],
)
async def test_bad_options_are_422_naming_the_field(api: Api, extra: dict[str, Any], field: str) -> None:
    r = await api.client.post("/api/v1/jobs", json={**SMALL, **extra}, headers=api.a)
    assert field in [e["field"] for e in assert_problem(r, 422)["errors"]]


def test_a_record_written_before_the_options_existed_still_loads() -> None:
    job = {"id": "a" * 32, "owner": "k", "status": "queued", "queue": "cpu", "spec": {},
           "created_at": "2026-11-30T00:00:00.000Z", "started_at": None, "finished_at": None,
           "updated_at": "2026-11-30T00:00:00.000Z", "error": None, "attempt": 0,
           "progress": {"megabatch": 0, "megabatches": None, "epoch": 0, "epochs": None, "fraction": 0.0},
           "latest_metrics": None, "result": None, "artifacts": [], "cancel_requested": False}
    record = JobRecord.model_validate(job)
    assert record.notify is None and record.tracking is None and record.mlflow is None
