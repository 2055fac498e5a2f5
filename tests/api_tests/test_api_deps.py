"""api/deps.py: API keys, authentication switched off, and owners' isolation."""

from __future__ import annotations

import pytest
from api_support import SMALL, Api, assert_problem, make_api

from app_common.settings import Settings

pytestmark = pytest.mark.anyio


async def test_auth_required(api: Api) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic dXNlcjpwdw=="}):
        r = await api.client.get("/api/v1/jobs", headers=headers)
        assert_problem(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = await api.client.post("/api/v1/jobs", json=SMALL)
    assert_problem(r, 401)
    assert api.queue_length() == 0
    assert (await api.client.get("/api/v1/jobs", headers=api.a)).status_code == 200
    api.store.revoke_key(api.owner_a)
    assert_problem(await api.client.get("/api/v1/jobs", headers=api.a), 401)


async def test_auth_can_be_disabled(settings: Settings) -> None:
    async for api in make_api(settings.model_copy(update={"auth_enabled": False})):
        job = await api.submit(headers={})
        r = await api.client.get("/api/v1/jobs")
        assert [j["id"] for j in r.json()["items"]] == [job["id"]]
        assert api.store.get_job(job["id"]).owner == "anonymous"


async def test_other_keys_jobs_are_404_everywhere(api: Api) -> None:
    job_id = (await api.submit())["id"]
    api.store.transition(job_id, "running", allowed_from={"queued"})
    api.store.transition(job_id, "succeeded", allowed_from={"running"})
    c, b = api.client, api.b
    for method, path in [
        ("GET", f"/api/v1/jobs/{job_id}"),
        ("POST", f"/api/v1/jobs/{job_id}/cancel"),
        ("DELETE", f"/api/v1/jobs/{job_id}"),
        ("GET", f"/api/v1/jobs/{job_id}/events"),
        ("GET", f"/api/v1/jobs/{job_id}/metrics"),
        ("GET", f"/api/v1/jobs/{job_id}/artifacts"),
        ("GET", "/api/v1/jobs/not-a-job"),
        ("GET", "/api/v1/jobs/x:events/metrics"),
    ]:
        assert_problem(await c.request(method, path, headers=b), 404)
    assert (await c.get("/api/v1/jobs", headers=b)).json() == {"items": [], "next_cursor": None}
    assert api.store.get_job(job_id).status == "succeeded"  # B's DELETE did nothing
