"""api/metrics.py: the Prometheus metrics."""

from __future__ import annotations

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
