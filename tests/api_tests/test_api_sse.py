"""api/sse.py: a job's events as Server-Sent Events."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import httpx
import pytest
import redis
from api_support import Api, assert_problem, epoch_event, parse_sse
from test_api_datasets import served

from api.sse import job_messages
from app_common.events import RunStarted
from app_common.settings import Settings

pytestmark = pytest.mark.anyio


async def test_events_in_order_then_end(api: Api) -> None:
    job_id = (await api.submit())["id"]
    store = api.store
    store.transition(job_id, "running", allowed_from={"queued"})
    store.append_event(job_id, RunStarted(megabatches=2, epochs=3))
    for e in (1, 2, 3):
        store.append_event(job_id, epoch_event(1, e, loss=1.0 / e))
    store.transition(job_id, "succeeded", allowed_from={"running"})
    expected = store.read_events(job_id)

    r = await api.client.get(f"/api/v1/jobs/{job_id}/events", headers=api.a)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    messages, _ = parse_sse(r.text)
    assert [m["id"] for m in messages] == [i for i, _ in expected]
    assert [m["event"] for m in messages] == ["status_changed", "run_started", "epoch_ended", "epoch_ended",
                                              "epoch_ended", "status_changed"]
    assert [m["data"] for m in messages] == [e for _, e in expected]
    assert messages[-1]["data"]["status"] == "succeeded"

    # Resume after the third event, by header or by query parameter.
    third = messages[2]["id"]
    resumes = ({"headers": {**api.a, "Last-Event-ID": third}}, {"headers": api.a, "params": {"last_event_id": third}})
    for kwargs in resumes:
        r = await api.client.get(f"/api/v1/jobs/{job_id}/events", **kwargs)
        assert [m["id"] for m in parse_sse(r.text)[0]] == [m["id"] for m in messages[3:]]
    # Resuming after the last event of a finished job ends at once.
    r = await api.client.get(f"/api/v1/jobs/{job_id}/events", headers={**api.a, "Last-Event-ID": messages[-1]["id"]})
    assert parse_sse(r.text)[0] == []
    for bad in ("x", "99999999999999999999-0"):
        r = await api.client.get(f"/api/v1/jobs/{job_id}/events", headers={**api.a, "Last-Event-ID": bad})
        assert [e["field"] for e in assert_problem(r, 422)["errors"]] == ["Last-Event-ID"]
    r = await api.client.get(f"/api/v1/jobs/{job_id}/events", params={"last_event_id": "1-99999999999999999999"},
                             headers=api.a)
    assert [e["field"] for e in assert_problem(r, 422)["errors"]] == ["last_event_id"]


async def test_events_live_with_heartbeats(api: Api) -> None:
    job_id = (await api.submit())["id"]
    store = api.store
    store.transition(job_id, "running", allowed_from={"queued"})

    async def worker() -> None:
        # Idle for a few heartbeats (0.2 s), then a megabatch and the end of the job.
        await anyio.sleep(0.7)
        for e in (1, 2, 3):
            await anyio.to_thread.run_sync(store.append_event, job_id, epoch_event(1, e, loss=0.3))
        await anyio.sleep(0.3)
        await anyio.to_thread.run_sync(
            lambda: store.transition(job_id, "succeeded", allowed_from={"running"})
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker)
        with anyio.fail_after(10):
            r = await api.client.get(f"/api/v1/jobs/{job_id}/events", headers=api.a)
    messages, comments = parse_sse(r.text)
    assert [m["event"] for m in messages] == ["status_changed"] + ["epoch_ended"] * 3 + ["status_changed"]
    assert [m["data"].get("epoch") for m in messages[1:4]] == [1, 2, 3]
    assert messages[-1]["data"]["status"] == "succeeded"
    # The stream stayed open while the job was idle (heartbeats) and closed with its end (above).
    assert comments >= 3
    assert r.text.startswith("retry: ")


class FakeFeed:
    """An EventFeed stand-in: serves ``batches`` of entries, then raises ``error`` if given."""

    def __init__(self, batches: list[list[tuple[str, dict[str, Any]]]], error: Exception | None = None) -> None:
        self.batches = batches
        self.error = error
        self.job_key = "fake:job"
        self.closed = False

    async def read(self, after: str, *, block: bool = False, count: int = 100) -> list[tuple[str, dict[str, Any]]]:
        if self.batches:
            return self.batches.pop(0)
        if self.error is not None:
            raise self.error
        await anyio.sleep(3600 if block else 0)
        return []

    async def job_status(self) -> str | None:
        return "running"

    async def aclose(self) -> None:
        self.closed = True


async def collect(feed: FakeFeed) -> list[Any]:
    return [message async for message in job_messages(feed, "0-0")]  # type: ignore[arg-type]


async def test_redis_dropping_ends_the_stream_with_an_error_event() -> None:
    feed = FakeFeed([[("1-0", {"type": "pruned"})]], error=redis.exceptions.ConnectionError("gone"))
    messages = await collect(feed)
    assert messages[0].retry == 3000
    assert [(m.id, m.event) for m in messages[1:]] == [("1-0", "pruned"), (None, "error")]
    assert "the job store became unavailable" in messages[-1].data and "gone" not in messages[-1].data
    assert feed.closed


async def test_a_client_going_away_closes_the_feed() -> None:
    feed = FakeFeed([[("1-0", {"type": "pruned"})]])
    with anyio.move_on_after(0.5):  # the reader blocks on an idle job; cancelling it is the disconnect
        await collect(feed)
    assert feed.closed


# --- the per-key cap across API processes, and revoked keys (real servers: streams stay open) -----
async def test_api_processes_share_each_keys_stream_cap_and_a_revoked_keys_stream_ends(
    api: Api, settings: Settings
) -> None:
    settings = settings.model_copy(update={"max_streams_per_key": 2, "sse_heartbeat_s": 0.2})
    job_a = (await api.submit())["id"]
    job_b = (await api.submit(headers=api.b))["id"]
    with served(settings) as one, served(settings) as two:
        async with httpx.AsyncClient(timeout=30) as http, contextlib.AsyncExitStack() as streams:

            async def open_stream(base: str, job_id: str, headers: dict[str, str]) -> httpx.Response:
                context = http.stream("GET", f"{base}/api/v1/jobs/{job_id}/events", headers=headers)
                response = await context.__aenter__()
                if response.status_code == 200:
                    streams.push_async_exit(context)
                else:
                    await response.aread()
                    await context.__aexit__(None, None, None)
                return response

            first = await open_stream(one, job_a, api.a)
            assert first.status_code == 200
            assert (await open_stream(two, job_a, api.a)).status_code == 200
            # Two open, one on each process: the cap (2) holds for both together.
            for base in (one, two):
                refused = await open_stream(base, job_a, api.a)
                assert refused.status_code == 429 and "2" in refused.json()["detail"]
            watched = await open_stream(one, job_b, api.b)  # another key is unaffected
            assert watched.status_code == 200
            assert api.store.open_streams(api.owner_a) == 2

            await first.aclose()  # one stream ends on process one: process two may open one
            for _ in range(100):  # hang guard: the server notices the closed connection
                status = (await open_stream(two, job_a, api.a)).status_code
                if status == 200:
                    break
                await anyio.sleep(0.05)
            assert status == 200

            # The key of an open stream is revoked: the stream ends with an error event.
            assert api.store.revoke_key(api.owner_b)
            with anyio.fail_after(10):  # hang guard: it ends at its next renewal, about a heartbeat
                text = (await watched.aread()).decode()
            messages, _ = parse_sse(text)
            assert messages[-1]["event"] == "error" and "revoked" in messages[-1]["data"]["detail"]
            assert (await open_stream(one, job_b, api.b)).status_code == 401
    assert api.store.open_streams(api.owner_a) == 0 and api.store.open_streams(api.owner_b) == 0
