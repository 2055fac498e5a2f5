"""Queueing a job: Redis failing between the record and its queue entry leaves no live job behind."""

from __future__ import annotations

import pytest
import redis
from api_support import SMALL, Api, assert_problem

from app_common.store import JobStore

pytestmark = pytest.mark.anyio


async def test_enqueue_failure_marks_job_failed(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(self: JobStore, queue: str, owner: str, job_id: str) -> None:
        raise redis.exceptions.ConnectionError("Error 111 connecting to 10.1.2.3:6379. Connection refused.")

    with monkeypatch.context() as patch:
        patch.setattr(JobStore, "enqueue_job", unreachable)
        r = await api.client.post("/api/v1/jobs", json=SMALL, headers={**api.a, "Idempotency-Key": "k"})
    problem = assert_problem(r, 503)
    assert r.headers["retry-after"]
    assert "10.1.2.3" not in problem["detail"] and "6379" not in problem["detail"]
    jobs, _ = api.store.list_jobs(api.owner_a)
    assert [j.status for j in jobs] == ["failed"]
    assert jobs[0].error.startswith("could not be queued")
    assert api.store.count_active(api.owner_a) == 0
    # The key was released: the retry (Redis back) goes through.
    r = await api.client.post("/api/v1/jobs", json=SMALL, headers={**api.a, "Idempotency-Key": "k"})
    assert r.status_code == 202 and "idempotent-replayed" not in r.headers
    assert api.queued_job_ids() == [r.json()["id"]]
