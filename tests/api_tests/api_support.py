"""What the API tests share: an app on a real Redis with two API keys, and readers of its answers.

Queueing is checked where the worker would look: the Celery message in the queue's Redis list.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from factories import epoch_ended

from api.main import create_app
from app_common.events import EpochEnded
from app_common.settings import Settings
from app_common.store import JobStore

REPO = Path(__file__).resolve().parents[2]


PROBLEM = "application/problem+json"


SMALL = {"training": {"epochs": 3}, "stream": {"megabatches": 2}}


class Api:
    """An app, a client on it, its store and two API keys."""

    def __init__(self, settings: Settings, client: httpx.AsyncClient, store: JobStore):
        self.settings = settings
        self.client = client
        self.store = store
        self.owner_a, secret_a = store.create_key("a")
        self.owner_b, secret_b = store.create_key("b")
        self.a = {"Authorization": f"Bearer {secret_a}"}
        self.b = {"Authorization": f"Bearer {secret_b}"}

    def queue_length(self, queue: str = "cpu") -> int:
        """Jobs waiting on ``queue`` in the store's per-key queues (the API sends nothing to Celery)."""
        assert self.store.celery_queue_length(queue, self.settings.celery_key_prefix) == 0
        return self.store.queued_count(queue)

    def queued_job_ids(self, queue: str = "cpu") -> list[str]:
        """Both keys' queued job ids on ``queue`` (a's first, then b's), oldest first."""
        assert self.store.celery_queue_length(queue, self.settings.celery_key_prefix) == 0
        return [job_id for owner in (self.owner_a, self.owner_b) for job_id in self.store.queued_job_ids(queue, owner)]

    async def submit(self, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> dict:
        r = await self.client.post("/api/v1/jobs", json=SMALL if body is None else body, headers=headers or self.a)
        assert r.status_code == 202, r.text
        return r.json()


async def make_api(settings: Settings) -> AsyncIterator[Api]:
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield Api(settings, client, app.state.store)
    app.state.store.close()
    app.state.celery.close()


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert set(body) == {"type", "title", "status", "detail", "errors"}
    assert body["status"] == status and body["detail"]
    return body


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the block ends


def epoch_event(m: int, e: int, loss: float) -> EpochEnded:
    return epoch_ended(m, e, epochs=3, loss=loss)


def parse_sse(text: str) -> tuple[list[dict[str, Any]], int]:
    """(messages with id/event/data, number of comment lines)."""
    messages, comments = [], 0
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                comments += 1
            elif line:
                key, _, value = line.partition(": ")
                fields[key] = value
        if "data" in fields:
            fields["data"] = json.loads(fields["data"])
            messages.append(fields)
    return messages, comments
