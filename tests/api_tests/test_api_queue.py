"""api/queue.py: a broker that cannot take the job."""

from __future__ import annotations

import time

import pytest
from api_support import SMALL, Api, assert_problem, closed_port

from api.queue import create_celery
from app_common.settings import Settings

pytestmark = pytest.mark.anyio


async def test_enqueue_failure_marks_job_failed(api: Api, settings: Settings) -> None:
    app = api.client._transport.app  # type: ignore[attr-defined]
    broken = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{closed_port()}/0"})
    app.state.celery = create_celery(broken)
    t0 = time.monotonic()
    r = await api.client.post("/api/v1/jobs", json=SMALL, headers={**api.a, "Idempotency-Key": "k"})
    assert time.monotonic() - t0 < 2.0
    assert_problem(r, 503)
    assert r.headers["retry-after"]
    jobs, _ = api.store.list_jobs(api.owner_a)
    assert [j.status for j in jobs] == ["failed"]
    assert jobs[0].error.startswith("could not be queued")
    assert api.store.count_active(api.owner_a) == 0
    app.state.celery.close()
    # The key was released: the retry (broker back) goes through.
    app.state.celery = create_celery(settings)
    r = await api.client.post("/api/v1/jobs", json=SMALL, headers={**api.a, "Idempotency-Key": "k"})
    assert r.status_code == 202 and "idempotent-replayed" not in r.headers
