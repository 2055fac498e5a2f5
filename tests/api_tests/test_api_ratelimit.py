"""api/ratelimit.py: the per-key submission rate limit, counted in a real Redis."""

from __future__ import annotations

import time

import pytest
from api_support import SMALL, Api, assert_problem, make_api

from app_common.settings import Settings

pytestmark = pytest.mark.anyio


async def test_over_the_limit_is_429_with_retry_after_and_other_keys_go_on(settings: Settings) -> None:
    limited = settings.model_copy(update={"submit_rate_limit": "3/minute", "max_concurrent_jobs_per_key": 10})
    async for api in make_api(limited):
        t0 = time.time()
        for _ in range(3):
            await api.submit()
        r = await api.client.post("/api/v1/jobs", json=SMALL, headers=api.a)
        problem = assert_problem(r, 429)
        assert problem["type"].endswith("submit-rate-limited")
        assert "3/minute" in problem["detail"]
        # Seconds until the oldest of the three leaves the one-minute window.
        retry_after = int(r.headers["retry-after"])
        assert 1 <= retry_after <= 60 - int(time.time() - t0) + 1
        assert str(retry_after) in problem["detail"]
        # Refused submissions store nothing and queue nothing.
        assert len(api.store.list_jobs(api.owner_a)[0]) == 3 and api.queue_length() == 3
        # Another key has its own window.
        assert (await api.client.post("/api/v1/jobs", json=SMALL, headers=api.b)).status_code == 202
        # The count lives in Redis under this deployment's prefix (shared by every API process).
        assert list(api.store.redis.scan_iter(match=f"{api.store.names.rate_limits}*"))


async def test_a_second_api_process_shares_the_count(settings: Settings) -> None:
    limited = settings.model_copy(update={"submit_rate_limit": "2 per hour", "max_concurrent_jobs_per_key": 10})
    async for first in make_api(limited):
        await first.submit()
        async for second in make_api(limited):
            headers = {"Authorization": first.a["Authorization"]}
            assert (await second.client.post("/api/v1/jobs", json=SMALL, headers=headers)).status_code == 202
            r = await second.client.post("/api/v1/jobs", json=SMALL, headers=headers)
            assert_problem(r, 429)
            assert 3500 <= int(r.headers["retry-after"]) <= 3600


async def test_invalid_bodies_do_not_count(settings: Settings) -> None:
    limited = settings.model_copy(update={"submit_rate_limit": "1/minute"})
    async for api in make_api(limited):
        for _ in range(3):
            r = await api.client.post("/api/v1/jobs", json={**SMALL, "method": "nope"}, headers=api.a)
            assert_problem(r, 422)
        await api.submit()


async def test_an_empty_limit_switches_it_off(settings: Settings) -> None:
    unlimited = settings.model_copy(update={"submit_rate_limit": "", "max_concurrent_jobs_per_key": 40})
    async for api in make_api(unlimited):
        for _ in range(35):
            await api.submit()


async def test_the_default_is_30_a_minute(api: Api) -> None:
    assert api.settings.submit_rate_limit == "30/minute"
    assert Settings(redis_url=None).submit_rate_limit == "30/minute"
