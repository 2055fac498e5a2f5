"""api/metrics.py: the Prometheus metrics."""

from __future__ import annotations

import re

import pytest
from api_support import Api

pytestmark = pytest.mark.anyio


async def test_prometheus_metrics(api: Api) -> None:
    done = (await api.submit())["id"]
    await api.submit()
    api.store.transition(done, "running", allowed_from={"queued"})
    api.store.transition(done, "succeeded", allowed_from={"running"})
    await api.client.get("/api/v1/jobs/0123/metrics", headers=api.a)
    r = await api.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values['jobs{status="queued"}'] == 1 and values['jobs{status="succeeded"}'] == 1
    assert values['queue_depth{queue="cpu"}'] == 2
    assert values['job_duration_seconds_count{status="succeeded"}'] == 1
    assert values['http_requests_total{method="POST",route="/api/v1/jobs",status="202"}'] == 2
    assert values['http_requests_total{method="GET",route="/api/v1/jobs/{job_id}/metrics",status="404"}'] == 1
    assert values["store_up"] == 1
    r = await api.client.get("/metrics")  # a finished job is observed once
    assert 'job_duration_seconds_count{status="succeeded"} 1.0' in r.text


async def test_request_labels_are_route_templates_or_one_unmatched_label(api: Api) -> None:
    """Whatever paths clients send, the route label is a route's template or "unmatched": the
    docs' static files, a path parameter spanning segments and unknown paths add no label of their
    own (the label set stays bounded)."""
    token = "Zq7odd"
    job_id = (await api.submit())["id"]
    for method, path in [
        ("GET", "/docs/assets/swagger-ui.css"),
        ("GET", f"/docs/assets/{token}.js"),
        ("GET", f"/docs/assets/{token}/a/b"),
        ("GET", f"/{token}"),
        ("GET", f"/api/v1/{token}/x%20y"),
        ("GET", f"/api/v1/jobs/{job_id}/events/{token}"),
        ("GET", f"/api/v1/artifacts/{job_id}/{token}/deeper/file.bin"),
        ("GET", f"/dashboard/{token}.js"),
        ("GET", f"/api/v1/jobs/{token}"),
        ("PROPFIND", f"/{token}/dav"),
        ("GET", "/api/v1/jobs/"),  # the router's redirect to the path without the slash
    ]:
        await api.client.request(method, path, headers=api.a)
    text = (await api.client.get("/metrics")).text
    routes = {}
    for line in text.splitlines():
        if line.startswith("http_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            routes.setdefault(labels["route"], set()).add(labels["method"])
    assert token not in text and job_id not in text
    assert set(routes) == {
        "/api/v1/jobs", "/docs/assets/{path}", "unmatched", "/api/v1/jobs/{job_id}",
        "/api/v1/artifacts/{job_id}/{name}", "/dashboard/{name}",
    }
    assert routes["unmatched"] == {"OTHER"}
