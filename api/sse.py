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
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis
from sse_starlette import EventSourceResponse, ServerSentEvent

from app_common.events import TERMINAL_STATUSES
from app_common.store import EventFeed

log = logging.getLogger(__name__)

# How long a client waits before reconnecting after the connection drops (SSE "retry:" field).
CLIENT_RETRY_MS = 3000
# Line ends of the messages: plain LF, which every SSE parser accepts.
SEP = "\n"


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
        detail = {"detail": f"the job store became unavailable: {exc}"}
        yield ServerSentEvent(json.dumps(detail), event="error", sep=SEP)
    finally:
        # Closing must finish even when the client disconnected and the task is being cancelled.
        with anyio.CancelScope(shield=True):
            await feed.aclose()


def event_source(feed: EventFeed, after: str, *, heartbeat_s: float) -> EventSourceResponse:
    return EventSourceResponse(
        job_messages(feed, after),
        ping=heartbeat_s,
        ping_message_factory=lambda: ServerSentEvent(comment="heartbeat", sep=SEP),
        sep=SEP,
        headers={"Cache-Control": "no-cache"},
    )
