"""A job's event stream and metric histories: appended by the worker, read by the API.

:class:`EventFeed` reads the same keys with ``redis.asyncio`` on a connection of its own, for the
API's Server-Sent Events: a blocking XREAD holds a connection for up to a heartbeat, and doing that
on the event loop (not in a worker thread) lets many clients follow jobs without exhausting the
thread pool.
"""

from __future__ import annotations

import json
from typing import Any, cast

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app_common.events import EVENT_TYPES, EpochEnded, Event, MegabatchEnded, event_to_dict
from app_common.jobs import PROGRESS_EVENTS, Progress, progress_after
from app_common.store._common import KeyNames, StoreBase, decode_entry, dumps, is_job_id, utc_now
from app_common.store.webhooks import ENQUEUE_WEBHOOK_LUA, now_ms
from app_common.webhooks import new_message_id

_APPEND = ENQUEUE_WEBHOOK_LUA + """
-- KEYS: job, events, history hash
-- ARGV: maxlen, type, event JSON, history mode ('' | 'nx' | 'set'), history field, history value,
--       prefix, job id, webhook-id ('' = none), now ms, now ISO, megabatch part JSON (a 'megabatch'
--       delivery, when the job's notify asks for it), then job field/value pairs to set
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[4] == 'nx' then
  if redis.call('HSETNX', KEYS[3], ARGV[5], ARGV[6]) == 0 then return false end
elseif ARGV[4] == 'set' then
  redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'type', ARGV[2], 'data', ARGV[3])
if #ARGV > 12 then
  local fields = {}
  for i = 13, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', KEYS[1], unpack(fields))
end
if ARGV[4] == 'nx' then enqueue_webhook(ARGV[7], ARGV[8], 'megabatch', ARGV[9], ARGV[10], ARGV[11], ARGV[12]) end
return id
"""

_IF_EXISTS_HINCRBY = """
-- KEYS: job; ARGV: field, increment. Never creates a record for a deleted job.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
"""

EVENT_CLASSES = tuple(EVENT_TYPES.values())

# A stream entry: (entry id, event dict).
Entry = tuple[str, dict[str, Any]]
# XREAD's answer with decoded responses: [(stream key, [(entry id, fields), ...]), ...] or None.
_XReadReply = list[tuple[str, list[tuple[str, dict[str, str]]]]] | None


def _entries(reply: _XReadReply) -> list[Entry]:
    out: list[Entry] = []
    for _stream, entries in reply or []:
        out += [(entry_id, decode_entry(fields)) for entry_id, fields in entries]
    return out


class EventOps(StoreBase):
    def append_event(self, job_id: str, event: Event) -> str | None:
        """Append ``event`` to the job's stream; returns the entry id.

        Also keeps the record's ``progress`` / ``latest_metrics`` and the metric histories up to
        date. A ``megabatch_ended`` for a megabatch already recorded (a redelivered job replaying
        it) is dropped and returns None, as does any event for a job that does not exist.
        """
        if not isinstance(event, EVENT_CLASSES):
            raise ValueError(f"not an event of app_common.events: {event!r}")
        if not is_job_id(job_id):
            return None
        raw_progress = self.redis.hget(self.names.job(job_id), "progress")
        if raw_progress is None:
            return None
        wire = event_to_dict(event)
        mode, hfield, hvalue, history_key = "", "", "", self.names.megabatches(job_id)
        msg_id, webhook_part = "", ""
        updates: dict[str, Any] = {}
        if isinstance(event, EpochEnded):
            mode, history_key, hfield = "set", self.names.epochs(job_id), f"{event.megabatch}:{event.epoch}"
            hvalue = dumps({k: v for k, v in wire.items() if k != "type"})
        elif isinstance(event, MegabatchEnded):
            # The metrics as the wire carries them, plus their megabatch number.
            metrics = dict(wire["metrics"])
            metrics.setdefault("megabatch", event.megabatch)
            mode, hfield, hvalue = "nx", str(event.megabatch), dumps(metrics)
            # A 'megabatch' webhook, queued by the script when the job's notify asks for it.
            msg_id, webhook_part = new_message_id(), dumps({"index": event.megabatch, "metrics": wire["metrics"]})
            updates["latest_metrics"] = metrics
        if isinstance(event, PROGRESS_EVENTS):
            updates["progress"] = progress_after(Progress.model_validate_json(raw_progress), event).model_dump()
        now = updates["updated_at"] = utc_now()
        pairs: list[str] = []
        for name, value in updates.items():
            pairs += [name, dumps(value)]
        entry_id = self._script(_APPEND)(
            keys=[self.names.job(job_id), self.names.events(job_id), history_key],
            args=[self.events_maxlen, event.type, dumps(wire), mode, hfield, hvalue,
                  self.prefix, job_id, msg_id, now_ms(), now, webhook_part, *pairs],
        )
        return str(entry_id) if entry_id else None

    def record_lost_events(self, job_id: str, count: int) -> None:
        """Add ``count`` to the record's ``events_lost``: events a worker dropped from a full buffer
        while Redis was unreachable, so the record says its event stream has a gap."""
        if count > 0 and is_job_id(job_id):
            self._script(_IF_EXISTS_HINCRBY)(keys=[self.names.job(job_id)], args=["events_lost", count])

    def read_events(
        self, job_id: str, after: str = "0-0", block_ms: int | None = None, count: int = 100
    ) -> list[Entry]:
        """Events after stream id ``after`` (oldest first), at most ``count``.

        ``block_ms`` waits that long for new entries; the client's socket timeout must be longer.
        """
        if not is_job_id(job_id):
            return []
        reply = cast(_XReadReply, self.redis.xread({self.names.events(job_id): after}, count=count, block=block_ms))
        return _entries(reply)

    def history(self, job_id: str) -> dict[str, list[dict[str, Any]]]:
        """Per-megabatch metrics (by megabatch) and per-epoch metrics (by megabatch, epoch)."""
        if not is_job_id(job_id):
            return {"megabatches": [], "epochs": []}
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.names.megabatches(job_id))
        pipe.hgetall(self.names.epochs(job_id))
        mb_raw, ep_raw = pipe.execute()
        megabatches = [json.loads(mb_raw[k]) for k in sorted(mb_raw, key=int)]
        epochs = [json.loads(ep_raw[k]) for k in sorted(ep_raw, key=lambda k: tuple(map(int, k.split(":"))))]
        return {"megabatches": megabatches, "epochs": epochs}


class EventFeed:
    """One job's events read asynchronously, for a Server-Sent Events response.

    Owns its client: call :meth:`aclose` when done (also when the reader is cancelled).
    """

    def __init__(
        self,
        redis_url: str,
        names: KeyNames,
        job_id: str,
        *,
        block_s: float,
        timeout_s: float,
        pool: aioredis.ConnectionPool | None = None,
    ) -> None:
        # With ``pool`` (the API's, shared by every stream) a read borrows a connection and aclose
        # only gives it back; the pool's connections need the socket timeouts below.
        self._client = aioredis.Redis(connection_pool=pool) if pool is not None else aioredis.Redis.from_url(
            redis_url,
            socket_connect_timeout=timeout_s,
            # A blocking read legitimately takes block_s; only longer than that is a dead server.
            socket_timeout=block_s + timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self._job_key = names.job(job_id)
        self._events_key = names.events(job_id)
        self.block_ms = max(1, int(block_s * 1000))

    @property
    def job_key(self) -> str:
        return self._job_key

    async def read(self, after: str, *, block: bool = False, count: int = 100) -> list[Entry]:
        """Entries after ``after``; with ``block``, waits up to ``block_s`` for the first one."""
        reply = await self._client.xread({self._events_key: after}, count=count, block=self.block_ms if block else None)
        return _entries(cast(_XReadReply, reply))

    async def job_status(self) -> str | None:
        """The job's status now; None when it was deleted."""
        raw = await self._client.hget(self._job_key, "status")
        return None if raw is None else str(json.loads(raw))

    async def aclose(self) -> None:
        await self._client.aclose()
