"""Server-Sent Events from a job's event stream, sent with sse-starlette.

One message per stream entry: ``id:`` is the entry id (so ``Last-Event-ID`` resumes exactly after
it), ``event:`` the event type, ``data:`` the event as one line of JSON. While the stream is open,
a comment line is sent every ``heartbeat_s`` seconds, which keeps proxies from closing the
connection and lets the server notice a client that went away (sse-starlette then cancels the
reader, whose ``finally`` closes its Redis connection). The stream ends once the job is terminal
and every event it has was sent; if Redis goes away it ends with an ``error`` event.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis
from pydantic import TypeAdapter
from redis.backoff import NoBackoff
from redis.retry import Retry
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from app_common.events import EVENT_TYPES, TERMINAL_STATUSES
from app_common.store import EventFeed

log = logging.getLogger(__name__)

# How long a client waits before reconnecting after the connection drops (SSE "retry:" field).
CLIENT_RETRY_MS = 3000
# Line ends of the messages: plain LF, which every SSE parser accepts.
SEP = "\n"
# CLIENT SETNAME of the streams' Redis connections, then ":" and the key prefix (CLIENT LIST shows
# how many each deployment holds).
SSE_CLIENT_NAME = "anytime-prune-sse"


def _message(entry_id: str, event: dict[str, Any]) -> ServerSentEvent:
    data = json.dumps(event, separators=(",", ":"))  # ensure_ascii: never a raw newline inside
    return ServerSentEvent(data, id=entry_id, event=str(event.get("type", "message")), sep=SEP)


def _is_terminal_event(event: dict[str, Any]) -> bool:
    return event.get("type") == "status_changed" and event.get("status") in TERMINAL_STATUSES


async def job_messages(feed: EventFeed, after: str) -> AsyncIterator[ServerSentEvent]:
    """The messages of the job behind ``feed`` after entry ``after``, until the job is terminal
    (or deleted) and all its events were sent. Closes ``feed`` when done or cancelled."""
    last = after
    seen_terminal = False
    try:
        yield ServerSentEvent(retry=CLIENT_RETRY_MS, sep=SEP)
        while True:
            entries = await feed.read(last)
            if not entries:
                if seen_terminal:
                    return
                status = await feed.job_status()
                if status is None or status in TERMINAL_STATUSES:
                    # The terminal status_changed may have been appended after the read above.
                    seen_terminal = True
                    continue
                # Blocks up to a heartbeat; sse-starlette sends the heartbeat comments meanwhile.
                entries = await feed.read(last, block=True)
            for entry_id, event in entries:
                last = entry_id
                seen_terminal = seen_terminal or _is_terminal_event(event)
                yield _message(entry_id, event)
    except redis.exceptions.RedisError as exc:
        log.warning("event stream of %s stopped: %s", feed.job_key, exc)
        # The reason stays in the server log: the client learns only that the store went away.
        detail = {"detail": "the job store became unavailable; reconnect with Last-Event-ID"}
        yield ServerSentEvent(json.dumps(detail), event="error", sep=SEP)
    finally:
        # Closing must finish even when the client disconnected and the task is being cancelled.
        with anyio.CancelScope(shield=True):
            await feed.aclose()


class StreamSlots:
    """Open event streams per API key, counted in this API process (not in Redis: a process that
    dies takes its streams and its counts with it, so nothing is ever left to expire). With N API
    processes behind a balancer one key can hold up to N times the cap."""

    def __init__(self, per_key: int):
        self.per_key = per_key
        self._open: Counter[str] = Counter()

    def acquire(self, owner: str) -> bool:
        # One event loop per process and no await in here: no lock needed.
        if self._open[owner] >= self.per_key:
            return False
        self._open[owner] += 1
        return True

    def release(self, owner: str) -> None:
        self._open[owner] -= 1
        if self._open[owner] <= 0:
            del self._open[owner]


def stream_pool(
    redis_url: str, *, max_connections: int, block_s: float, timeout_s: float, prefix: str
) -> aioredis.ConnectionPool:
    """The connections every event stream of this process borrows from: at most
    ``max_connections``; a read waits for a free one up to about a heartbeat, then fails (the
    stream ends with an ``error`` event and the client reconnects with Last-Event-ID)."""
    return aioredis.BlockingConnectionPool.from_url(
        redis_url,
        max_connections=max_connections,
        timeout=block_s + timeout_s,
        socket_connect_timeout=timeout_s,
        # A blocking read legitimately takes block_s; only longer than that is a dead server.
        socket_timeout=block_s + timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
        client_name=f"{SSE_CLIENT_NAME}:{prefix}",
    )


class _CountedEventSource(EventSourceResponse):
    """Gives the stream's slot back however the response ends (done, client gone, error)."""

    def __init__(self, *args: Any, on_close: Callable[[], None], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def event_source(
    feed: EventFeed, after: str, *, heartbeat_s: float, on_close: Callable[[], None]
) -> EventSourceResponse:
    return _CountedEventSource(
        job_messages(feed, after),
        on_close=on_close,
        ping=heartbeat_s,
        ping_message_factory=lambda: ServerSentEvent(comment="heartbeat", sep=SEP),
        sep=SEP,
        headers={"Cache-Control": "no-cache"},
    )


def event_stream_openapi(ref_prefix: str = "#/components/schemas/") -> tuple[dict[str, Any], dict[str, Any]]:
    """The OpenAPI media type object of the stream and the component schemas it names.

    Before OpenAPI 3.2 (``itemSchema``) the ``schema`` of ``text/event-stream`` describes one
    message: its ``event`` (the event type), ``id`` (the stream entry id) and ``data``, a JSON
    document: the event of that type, or ``{"detail"}`` for an ``error`` message.
    """
    components: dict[str, Any] = {}
    variants = []
    for kind, cls in EVENT_TYPES.items():
        schema = TypeAdapter(cls).json_schema(ref_template=ref_prefix + "{model}")
        components.update(schema.pop("$defs", {}))
        schema["properties"]["type"] = {"const": kind}
        schema["required"] = sorted({*schema.get("required", []), "type"})
        components[cls.__name__] = schema
        variants.append({
            "properties": {
                "event": {"const": kind},
                "data": {"contentMediaType": "application/json", "contentSchema": {"$ref": ref_prefix + cls.__name__}},
            }
        })
    for schema in components.values():
        _nullable_numbers(schema)
    components["StreamError"] = {
        "type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}
    }
    variants.append({
        "properties": {
            "event": {"const": "error"},
            "data": {"contentMediaType": "application/json", "contentSchema": {"$ref": ref_prefix + "StreamError"}},
        }
    })
    message = {
        "type": "object",
        "required": ["data", "event"],
        "properties": {
            "event": {"type": "string", "enum": [*EVENT_TYPES, "error"]},
            "id": {"type": "string", "pattern": r"^[0-9]+-[0-9]+$", "description": "Stream entry id (Last-Event-ID)."},
            "retry": {"type": "integer", "minimum": 0},
            "data": {"type": "string", "contentMediaType": "application/json"},
        },
        "oneOf": variants,
    }
    return {"schema": message}, components


def _nullable_numbers(schema: Any) -> None:
    """Numbers may be null: the store writes a non-finite value (a NaN loss) as null (JSON has no NaN)."""
    if isinstance(schema, dict):
        if schema.get("type") == "number":
            schema["type"] = ["number", "null"]
        for value in schema.values():
            _nullable_numbers(value)
    elif isinstance(schema, list):
        for value in schema:
            _nullable_numbers(value)
