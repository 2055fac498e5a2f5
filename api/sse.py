"""Server-Sent Events from a job's event stream, sent with sse-starlette.

One message per stream entry: ``id:`` is the entry id (so ``Last-Event-ID`` resumes exactly after
it), ``event:`` the event type, ``data:`` the event as one line of JSON. While the stream is open,
a comment line is sent every ``heartbeat_s`` seconds, which keeps proxies from closing the
connection and lets the server notice a client that went away (sse-starlette then cancels the
reader, whose ``finally`` closes its Redis connection). The stream ends once the job is terminal
and every event it has was sent; if Redis goes away it ends with an ``error`` event, and so it
does when the API key it was opened with is revoked (checked as the stream renews its slot).

One API key holds at most ``APP_MAX_STREAMS_PER_KEY`` open streams across every API process: each
stream leases a slot in Redis (:class:`StreamSlots`), renews it about every heartbeat and gives it
back when it ends; a process that dies leaves slots whose leases end within :func:`stream_lease_s`.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
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
from app_common.store import EventFeed, JobStore

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


async def job_messages(
    feed: EventFeed, after: str, slot: StreamSlot | None = None, *, renew_every_s: float = 0.0
) -> AsyncIterator[ServerSentEvent]:
    """The messages of the job behind ``feed`` after entry ``after``, until the job is terminal
    (or deleted) and all its events were sent. Renews ``slot`` every ``renew_every_s`` (a read
    waits up to a heartbeat in between) and ends with an ``error`` event once the API key was
    revoked. Closes ``feed`` when done or cancelled."""
    last = after
    seen_terminal = False
    renewed = anyio.current_time()
    try:
        yield ServerSentEvent(retry=CLIENT_RETRY_MS, sep=SEP)
        while True:
            if slot is not None and anyio.current_time() - renewed >= renew_every_s:
                if not await slot.renew():
                    log.info("event stream of %s closed: its API key was revoked", feed.job_key)
                    detail = {"detail": "the API key was revoked"}
                    yield ServerSentEvent(json.dumps(detail), event="error", sep=SEP)
                    return
                renewed = anyio.current_time()
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


def stream_lease_s(heartbeat_s: float, timeout_s: float) -> float:
    """How long a stream's slot lasts without renewal: three heartbeats (a stream renews about
    every one) and two Redis timeouts. A dead process's slots are free again after this."""
    return 3 * heartbeat_s + 2 * timeout_s


class StreamSlot:
    """The leased slot of one open stream (see :class:`StreamSlots`)."""

    def __init__(self, slots: StreamSlots, owner: str, key_digest: str | None) -> None:
        self.slots = slots
        self.owner = owner
        self.key_digest = key_digest
        self.slot_id = uuid.uuid4().hex

    async def renew(self) -> bool:
        """Extend the lease; False when the API key was revoked (the slot is then given back)."""
        store, lease_s = self.slots.store, self.slots.lease_s
        return await anyio.to_thread.run_sync(
            store.renew_stream_slot, self.owner, self.slot_id, lease_s, self.key_digest
        )

    async def release(self) -> None:
        """Give the slot back; when Redis cannot be reached its lease ends on its own."""
        try:
            await anyio.to_thread.run_sync(self.slots.store.release_stream_slot, self.owner, self.slot_id)
        except redis.exceptions.RedisError as exc:
            log.warning("stream slot of %s not given back (its lease ends on its own): %s", self.owner, exc)


class StreamSlots:
    """At most ``per_key`` open event streams per API key, counted in Redis for every API process
    together (before, each process counted its own, so N processes allowed N times the cap).

    The slots are leases (``lease_s``), so a process that dies without giving its slots back frees
    them when they end. Renewing also checks that the stream's API key still exists. The calls go
    through the job store's client in a worker thread, not through the streams' pool: a new
    stream must not wait behind the blocking reads of the open ones.
    """

    def __init__(self, store: JobStore, *, per_key: int, lease_s: float) -> None:
        self.store = store
        self.per_key = per_key
        self.lease_s = lease_s

    async def acquire(self, owner: str, key_digest: str | None = None) -> StreamSlot | None:
        """A slot for a new stream of ``owner``, or None when it holds ``per_key`` already.
        ``key_digest`` (sha256 of the key's secret) lets renewals notice a revoked key; None
        (authentication off) checks nothing."""
        slot = StreamSlot(self, owner, key_digest)
        taken = await anyio.to_thread.run_sync(
            self.store.acquire_stream_slot, owner, slot.slot_id, self.per_key, self.lease_s
        )
        return slot if taken else None


def stream_slots(store: JobStore, *, per_key: int, heartbeat_s: float, timeout_s: float) -> StreamSlots:
    return StreamSlots(store, per_key=per_key, lease_s=stream_lease_s(heartbeat_s, timeout_s))


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

    def __init__(self, *args: Any, slot: StreamSlot, release_timeout_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._slot = slot
        self._release_timeout_s = release_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Also when cancelled (the client went away); past the timeout the lease ends on its own.
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._release_timeout_s):
                await self._slot.release()


def event_source(
    feed: EventFeed, after: str, *, heartbeat_s: float, timeout_s: float, slot: StreamSlot
) -> EventSourceResponse:
    return _CountedEventSource(
        job_messages(feed, after, slot, renew_every_s=heartbeat_s / 2),
        slot=slot,
        release_timeout_s=heartbeat_s + 2 * timeout_s,
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
