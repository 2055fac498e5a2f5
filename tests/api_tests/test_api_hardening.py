"""Issue 11's HTTP fixes: strict request types, the published schema matching the answers, 405/415,
HEAD, conditional and ranged downloads, and event streams capped per key on a bounded pool."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jsonschema_rs
import pytest
import redis
from api_support import SMALL, Api, assert_problem
from test_api_artifacts import finished_job_with_artifacts
from test_api_datasets import served

from api.sse import SSE_CLIENT_NAME
from app_common.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("body", "field"), [
    ({"training": {"epochs": "3"}}, "training.epochs"),
    ({"training": {"epochs": True}}, "training.epochs"),
    ({"training": {"seed": False}}, "training.seed"),
    ({"sparsity": {"target": "0.5"}}, "sparsity.target"),
])
async def test_request_types_are_strict(api: Api, body: dict[str, Any], field: str) -> None:
    problem = assert_problem(await api.client.post("/api/v1/jobs", json=body, headers=api.a), 422)
    assert [e["field"] for e in problem["errors"]] == [field]
    assert api.queue_length() == 0


async def test_over_the_spec_bound_the_422_states_the_servers_limit(api: Api) -> None:
    body = {"stream": {"megabatches": 5000}, "training": {"epochs": 20_000}}
    problem = assert_problem(await api.client.post("/api/v1/jobs", json=body, headers=api.a), 422)
    reasons = {e["field"]: e["reason"] for e in problem["errors"]}
    assert reasons == {"stream.megabatches": "at most 10 on this server",
                       "training.epochs": "at most 20 on this server"}


async def test_responses_validate_against_the_published_schema(api: Api) -> None:
    doc = (await api.client.get("/openapi.json")).json()
    job = await api.submit({"sparsity": {"target": 0.5}, **{"training": {"epochs": 2}}})
    schema = {"$ref": "#/components/schemas/JobPublic", "components": doc["components"]}
    assert jsonschema_rs.validator_for(schema).is_valid(job)  # both target and tau keys, tau null
    spec = {"$ref": "#/components/schemas/JobSpec", "components": doc["components"]}
    assert not jsonschema_rs.validator_for(spec).is_valid({"sparsity": {"target": 0.5, "tau": 2.0}})
    # This server's limits, not the spec's.
    spec_schemas = doc["components"]["schemas"]
    assert spec_schemas["TrainingSpec"]["properties"]["epochs"]["maximum"] == 20
    assert spec_schemas["StreamSpec"]["properties"]["megabatches"]["maximum"] == 10
    assert spec_schemas["TrainingSpec"]["properties"]["device"]["enum"] == ["auto", "cpu"]
    events = doc["paths"]["/api/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert list(events) == ["text/event-stream"]
    message = events["text/event-stream"]["schema"]
    assert message["type"] == "object" and "epoch_ended" in message["properties"]["event"]["enum"]


async def test_allow_lists_every_method_of_the_path(api: Api) -> None:
    job_id = (await api.submit())["id"]
    for method in ("OPTIONS", "PUT", "PATCH"):
        r = await api.client.request(method, f"/api/v1/jobs/{job_id}", headers=api.a)
        assert_problem(r, 405)
        assert set(r.headers["allow"].split(", ")) == {"GET", "DELETE"}
    r = await api.client.request("PATCH", "/api/v1/jobs", headers=api.a)
    assert set(assert_problem(r, 405) and r.headers["allow"].split(", ")) == {"GET", "POST"}


async def test_a_body_that_is_not_json_is_415(api: Api) -> None:
    for path in ("/api/v1/jobs", "/api/v1/datasets"):
        r = await api.client.post(path, content=b'{"training": {}}', headers={**api.a, "Content-Type": "text/plain"})
        assert "application/json" in assert_problem(r, 415)["detail"]
    small = json.dumps(SMALL).encode()
    r = await api.client.post("/api/v1/jobs", content=small, headers={**api.a, "Content-Type": "application/json"})
    assert r.status_code == 202


async def test_head_answers_like_get_without_a_body(api: Api) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/api/v1/catalog"):
        get, head = await api.client.get(path), await api.client.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    job_id, files = await finished_job_with_artifacts(api)
    link = (await api.client.get(f"/api/v1/jobs/{job_id}/artifacts", headers=api.a)).json()[0]
    head = await api.client.head(link["download_url"])
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == link["bytes"] and head.headers["etag"] == f'"{link["sha256"]}"'


async def test_conditional_and_ranged_downloads(api: Api) -> None:
    job_id, files = await finished_job_with_artifacts(api)
    link = next(a for a in (await api.client.get(f"/api/v1/jobs/{job_id}/artifacts", headers=api.a)).json()
                if a["name"] == "model.safetensors")
    url, data = link["download_url"], files["model.safetensors"]
    etag = (await api.client.get(url)).headers["etag"]
    r = await api.client.get(url, headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    assert (await api.client.get(url, headers={"If-None-Match": '"other"'})).status_code == 200
    r = await api.client.get(url, headers={"Range": "bytes=5-9"})
    assert r.status_code == 206 and r.content == data[5:10]
    r = await api.client.get(url, headers={"Range": "bytes=5-1"})  # malformed: ignored, the whole file
    assert r.status_code == 200 and r.content == data
    r = await api.client.get(url, headers={"Range": "bytes=99999-"})
    assert_problem(r, 416)
    assert r.headers["content-range"] == f"bytes */{len(data)}"


# --- event streams: capped per key, on a bounded pool (a real server: streams stay open) ----------
def stream_clients(client: redis.Redis, prefix: str) -> int:
    return sum(1 for c in client.client_list() if c.get("name") == f"{SSE_CLIENT_NAME}:{prefix}")


async def test_event_streams_are_capped_per_key_on_a_bounded_pool(api: Api, settings: Settings) -> None:
    settings = settings.model_copy(update={"max_streams_per_key": 16, "sse_redis_connections": 4,
                                           "sse_heartbeat_s": 0.2})
    job_a = (await api.submit())["id"]
    job_b = (await api.submit(headers=api.b))["id"]
    with served(settings) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            streams: list[Any] = []

            async def open_stream(job_id: str, headers: dict[str, str]) -> tuple[int, Any]:
                context = http.stream("GET", f"/api/v1/jobs/{job_id}/events", headers=headers)
                response = await context.__aenter__()
                if response.status_code == 200:
                    streams.append(context)
                else:
                    await response.aread()
                    await context.__aexit__(None, None, None)
                return response.status_code, response

            for _ in range(16):
                assert (await open_stream(job_a, api.a))[0] == 200
            status, refused = await open_stream(job_a, api.a)
            assert status == 429 and int(refused.headers["retry-after"]) >= 1
            assert "16" in refused.json()["detail"]
            assert (await open_stream(job_b, api.b))[0] == 200  # another key is unaffected
            await asyncio.sleep(1.0)  # every stream has read and blocked at least once
            # 17 open streams share at most 4 connections (before: one client each).
            assert 1 <= stream_clients(api.store.redis, settings.redis_prefix) <= 4
            for context in streams[:3]:
                await context.__aexit__(None, None, None)
            del streams[:3]
            for _ in range(40):  # the server notices the closed connections
                status, _ = await open_stream(job_a, api.a)
                if status == 200:
                    break
                await asyncio.sleep(0.1)
            assert status == 200
            for context in streams:
                await context.__aexit__(None, None, None)
