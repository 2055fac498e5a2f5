"""Server-Sent Events from a job's Redis stream.

One message per stream entry: ``id:`` is the entry id (so ``Last-Event-ID`` resumes exactly after
it), ``event:`` the event type, ``data:`` the event as one line of JSON. While nothing happens a
comment line is sent every ``heartbeat_s`` seconds, which keeps proxies from closing the connection
and lets the server notice a client that went away. The stream ends once the job is terminal and
every event it has was sent.

Reading uses ``redis.asyncio`` with its own connection: a blocking XREAD holds a connection for up
to ``heartbeat_s``, and doing that on the event loop (not in a worker thread) lets many clients
follow jobs without exhausting the thread pool.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app_common.events import TERMINAL_STATUSES
from app_common.store import decode_entry

log = logging.getLogger(__name__)

# How long a client waits before reconnecting after the connection drops (SSE "retry:" field).
CLIENT_RETRY_MS = 3000


def format_event(entry_id: str, event: dict[str, Any]) -> str:
    kind = str(event.get("type", "message")).replace("\n", " ").replace("\r", " ")
    data = json.dumps(event, separators=(",", ":"))  # ensure_ascii: never a raw newline inside
    return f"id: {entry_id}\nevent: {kind}\ndata: {data}\n\n"


def _is_terminal_event(event: dict[str, Any]) -> bool:
    return event.get("type") == "status_changed" and event.get("status") in TERMINAL_STATUSES


async def event_stream(
    *,
    redis_url: str,
    job_key: str,
    events_key: str,
    after: str,
    heartbeat_s: float,
    timeout_s: float,
) -> AsyncIterator[str]:
    """SSE text chunks for the stream ``events_key`` after entry ``after`` until the job (hash
    ``job_key``) is terminal or deleted."""
    block_ms = max(1, int(heartbeat_s * 1000))
    client = aioredis.Redis.from_url(
        redis_url,
        socket_connect_timeout=timeout_s,
        # A blocking read legitimately takes block_ms; only longer than that is a dead server.
        socket_timeout=heartbeat_s + timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )
    last = after
    seen_terminal = False

    async def read(block: int | None) -> list[tuple[str, dict[str, str]]]:
        reply = await client.xread({events_key: last}, count=100, block=block)
        return list(reply[0][1]) if reply else []

    async def job_over() -> bool:
        raw = await client.hget(job_key, "status")
        return raw is None or json.loads(raw) in TERMINAL_STATUSES

    try:
        yield f"retry: {CLIENT_RETRY_MS}\n\n"
        while True:
            entries = await read(None)
            if not entries:
                if seen_terminal:
                    return
                if await job_over():
                    # The terminal status_changed may have been appended after the read above.
                    seen_terminal = True
                    continue
                entries = await read(block_ms)
                if not entries:
                    yield ": heartbeat\n\n"
                    continue
            for entry_id, fields in entries:
                event = decode_entry(fields)
                last = entry_id
                seen_terminal = seen_terminal or _is_terminal_event(event)
                yield format_event(entry_id, event)
    except redis.exceptions.RedisError as exc:
        log.warning("event stream of %s stopped: %s", job_key, exc)
        yield "event: error\ndata: " + json.dumps({"detail": f"the job store became unavailable: {exc}"}) + "\n\n"
    finally:
        # Closing must finish even when the client disconnected and the task is being cancelled.
        with anyio.CancelScope(shield=True):
            await client.aclose()
