"""api/errors.py and api/middleware.py: every failure is a problem document; Redis down is a fast 503."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest
from api_support import SMALL, Api, assert_problem, closed_port

from api.main import create_app
from app_common.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "raw",
    [b'{"dataset":', b"[]", b'"job"', b"\xff\xfe{}", b"[" * 1500 + b"]" * 1500],
    ids=["cut", "list", "str", "utf8", "deep"],
)
async def test_malformed_json_is_422_on_body(api: Api, raw: bytes) -> None:
    r = await api.client.post("/api/v1/jobs", content=raw, headers={**api.a, "Content-Type": "application/json"})
    problem = assert_problem(r, 422)
    assert [e["field"] for e in problem["errors"]] == ["body"]


async def test_http_errors_are_problems(api: Api) -> None:
    assert_problem(await api.client.get("/api/v1/nothing-here"), 404)
    r = await api.client.put("/api/v1/jobs", headers=api.a)
    assert_problem(r, 405)
    assert "POST" in r.headers["allow"]
    big = {"dataset": {"name": "npz", "path": "x" * 5000}}
    too_large = assert_problem(await api.client.post("/api/v1/jobs", json=big, headers=api.a), 413)
    assert too_large["type"] == "urn:anytime-prune:problem:body-too-large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while streaming
        for _ in range(10):
            yield b" " * 1000

    r = await api.client.post("/api/v1/jobs", content=chunks(), headers={**api.a, "Content-Type": "application/json"})
    assert assert_problem(r, 413)["type"] == too_large["type"]  # the same problem either way
    assert api.queue_length() == 0


async def test_redis_down_is_fast_503(settings: Settings) -> None:
    port = closed_port()
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    async for api_down in _app_without_keys(down):
        client = api_down
        t0 = time.monotonic()
        for method, path in [("GET", "/api/v1/jobs"), ("POST", "/api/v1/jobs"), ("GET", "/api/v1/jobs/" + "a" * 32),
                             ("GET", "/api/v1/jobs/" + "a" * 32 + "/events")]:
            r = await client.request(method, path, json=SMALL if method == "POST" else None,
                                     headers={"Authorization": "Bearer whatever"})
            detail = assert_problem(r, 503)["detail"]
            assert "store" in detail and "127.0.0.1" not in detail and str(port) not in detail  # no internals
            assert int(r.headers["retry-after"]) > 0
        r = await client.get("/readyz")  # unauthenticated: what is wrong, not where
        detail = assert_problem(r, 503)["detail"]
        assert "store" in detail and "127.0.0.1" not in detail and str(port) not in detail
        assert time.monotonic() - t0 < 2.0
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/api/v1/catalog")).status_code == 200
        r = await client.get("/metrics")
        assert r.status_code == 200 and "store_up 0.0" in r.text


async def _app_without_keys(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        yield client
