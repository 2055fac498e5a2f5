"""The job store: job records, event streams, metric histories, leases and API keys in Redis.

The job record in Redis is the source of truth of a job's state (Celery only carries the job id).
The API writes records and reads them; the worker moves them through their lifecycle and appends
events. Every multi-key change is one Lua script, so readers never see half an update and two
deliveries of the same job cannot both win a status change.

Key layout under the prefix ``p`` (see docs/SERVICE_CONTRACTS.md)::

    {p}:job:{id}                 hash   each field JSON-encoded (see ``JobStore.create_job``)
    {p}:job:{id}:events          stream entries {type, data: JSON event}, trimmed (MAXLEN ~)
    {p}:job:{id}:megabatches     hash   megabatch index -> metrics JSON (HSETNX: first write wins)
    {p}:job:{id}:epochs          hash   "{megabatch}:{epoch}" -> epoch_ended JSON
    {p}:job:{id}:lease           string lease token, PX expiry
    {p}:owner:{owner}:jobs       zset   job ids, score = created time in ms
    {p}:owner:{owner}:active     set    the owner's non-terminal job ids (concurrency limit)
    {p}:jobs:status:{status}     set    job ids per status
    {p}:idem:{owner}:{key}       string Idempotency-Key record JSON, with a TTL
    {p}:keys                     hash   sha256(secret) -> API key record JSON

Torch-free; the client must be created with ``decode_responses=True`` (see :func:`make_redis`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import re
import secrets
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app_common.events import CANCELLED, CANCELLING, QUEUED, RUNNING, STATUSES

log = logging.getLogger(__name__)

# Job ids are uuid4 hex; anything else is not a job (and must never reach a Redis key name).
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_OWNER = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_IDEM_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")

# Fields of the job hash; each value is JSON so that ints, dicts and None survive the round trip.
JOB_FIELDS = (
    "id",
    "owner",
    "spec",
    "status",
    "queue",
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
    "error",
    "attempt",
    "progress",
    "latest_metrics",
    "result",
    "artifacts",
    "cancel_requested",
)


class JobNotFound(KeyError):
    """The job does not exist (never created, or deleted)."""


class TooManyActiveJobs(RuntimeError):
    """The owner already has the maximum number of queued or running jobs."""


class InvalidCursor(ValueError):
    """A pagination cursor that this store did not issue."""


def utc_now() -> str:
    """ISO 8601 UTC timestamp with milliseconds, e.g. ``2025-01-31T12:00:00.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def make_redis(url: str, *, timeout_s: float = 1.0) -> redis.Redis:
    """A client that fails fast: connect and read timeouts of ``timeout_s`` and no retries, so an
    unreachable Redis is reported within about ``timeout_s`` instead of hanging."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        decode_responses=True,
    )


def is_job_id(value: str) -> bool:
    return bool(_JOB_ID.match(value))


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, so every stored document is strict JSON
    (browsers' ``JSON.parse`` rejects ``NaN``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(json_safe(value), separators=(",", ":"), allow_nan=False)


def decode_entry(fields: dict[str, str]) -> dict[str, Any]:
    """The event dict of one stream entry (its fields are ``{"type": ..., "data": JSON}``)."""
    data = fields.get("data")
    event: dict[str, Any] = json.loads(data) if data else {}
    event.setdefault("type", fields.get("type", "unknown"))
    return event


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# --- Lua scripts ------------------------------------------------------------------------------
# Keys built inside the scripts from the prefix are fine on a single Redis (our deployment) and
# keep each change atomic; a Redis Cluster would need hash tags.

_CREATE = """
-- KEYS: job, owner zset, owner active set, status set of 'queued'
-- ARGV: id, score, max_active (-1: no limit), field1, value1, ...
local max_active = tonumber(ARGV[3])
if max_active >= 0 and redis.call('SCARD', KEYS[3]) >= max_active then return 0 end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
return 1
"""

_TERMINAL_LUA = "local terminal = {succeeded=true, failed=true, cancelled=true}\n"

_MOVE_LUA = """
local function move(prefix, id, owner, from, to, now, maxlen, events_key, event)
  redis.call('SREM', prefix .. ':jobs:status:' .. from, id)
  redis.call('SADD', prefix .. ':jobs:status:' .. to, id)
  redis.call('HSET', prefix .. ':job:' .. id, 'status', cjson.encode(to), 'updated_at', now)
  if terminal[to] then
    redis.call('HSET', prefix .. ':job:' .. id, 'finished_at', now)
    redis.call('SREM', prefix .. ':owner:' .. owner .. ':active', id)
  end
  redis.call('XADD', events_key, 'MAXLEN', '~', maxlen, '*', 'type', 'status_changed', 'data', event)
end
"""

_TRANSITION = (
    _TERMINAL_LUA
    + _MOVE_LUA
    + """
-- KEYS: job, events
-- ARGV: prefix, id, to, now (JSON), maxlen, event JSON, error JSON ('' = keep), allowed (comma list)
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw then return 0 end
local cur = cjson.decode(raw)
if terminal[cur] then return 0 end
local allowed = false
for s in string.gmatch(ARGV[8], '[^,]+') do
  if s == cur then allowed = true end
end
if not allowed then return 0 end
local owner = cjson.decode(redis.call('HGET', KEYS[1], 'owner'))
if ARGV[3] == 'running' and redis.call('HGET', KEYS[1], 'started_at') == 'null' then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[4])
end
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[7]) end
move(ARGV[1], ARGV[2], owner, cur, ARGV[3], ARGV[4], ARGV[5], KEYS[2], ARGV[6])
return 1
"""
)

_CANCEL = (
    _TERMINAL_LUA
    + _MOVE_LUA
    + """
-- KEYS: job, events
-- ARGV: prefix, id, now (JSON), maxlen, event JSON for queued->cancelled, event JSON for ->cancelling
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw then return -1 end
local cur = cjson.decode(raw)
if terminal[cur] then return 0 end
redis.call('HSET', KEYS[1], 'cancel_requested', 'true', 'updated_at', ARGV[3])
local owner = cjson.decode(redis.call('HGET', KEYS[1], 'owner'))
if cur == 'queued' then
  move(ARGV[1], ARGV[2], owner, cur, 'cancelled', ARGV[3], ARGV[4], KEYS[2], ARGV[5])
elseif cur == 'running' then
  move(ARGV[1], ARGV[2], owner, cur, 'cancelling', ARGV[3], ARGV[4], KEYS[2], ARGV[6])
end
return 1
"""
)

_APPEND = """
-- KEYS: job, events, history hash
-- ARGV: maxlen, type, event JSON, history mode ('' | 'nx' | 'set'), history field, history value,
--       then job field/value pairs to set
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[4] == 'nx' then
  if redis.call('HSETNX', KEYS[3], ARGV[5], ARGV[6]) == 0 then return false end
elseif ARGV[4] == 'set' then
  redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'type', ARGV[2], 'data', ARGV[3])
if #ARGV > 6 then
  local fields = {}
  for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', KEYS[1], unpack(fields))
end
return id
"""

_IF_EXISTS_HSET = """
-- KEYS: job; ARGV: field/value pairs. Never creates a record for a deleted job.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

_NEXT_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('HINCRBY', KEYS[1], 'attempt', 1)
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class JobStore:
    """Redis-backed jobs, events and API keys. One instance per process; thread-safe (the redis
    client pools connections)."""

    def __init__(self, redis_client: redis.Redis, prefix: str = "app", events_maxlen: int = 10000):
        kwargs = redis_client.connection_pool.connection_kwargs
        if not kwargs.get("decode_responses"):
            raise ValueError("JobStore needs a Redis client created with decode_responses=True")
        self.redis = redis_client
        self.prefix = prefix
        self.events_maxlen = events_maxlen
        self._create = redis_client.register_script(_CREATE)
        self._transition = redis_client.register_script(_TRANSITION)
        self._cancel = redis_client.register_script(_CANCEL)
        self._append = redis_client.register_script(_APPEND)
        self._hset_existing = redis_client.register_script(_IF_EXISTS_HSET)
        self._next_attempt = redis_client.register_script(_NEXT_ATTEMPT)
        self._renew = redis_client.register_script(_RENEW)
        self._release = redis_client.register_script(_RELEASE)

    # --- key names ----------------------------------------------------------------------------
    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def _megabatches_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:megabatches"

    def _epochs_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:epochs"

    def _lease_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:lease"

    def _owner_key(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:jobs"

    def _active_key(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:active"

    def _status_key(self, status: str) -> str:
        return f"{self.prefix}:jobs:status:{status}"

    def _idem_key(self, owner: str, key: str) -> str:
        return f"{self.prefix}:idem:{owner}:{key}"

    @property
    def _keys_key(self) -> str:
        return f"{self.prefix}:keys"

    # --- jobs ---------------------------------------------------------------------------------
    def create_job(
        self, owner: str, spec: dict[str, Any], *, queue: str, max_active: int | None = None
    ) -> dict[str, Any]:
        """Write a new job with status ``queued``; returns its record.

        With ``max_active``, raises :class:`TooManyActiveJobs` (atomically, so concurrent
        submissions cannot overshoot) when ``owner`` already has that many non-terminal jobs.
        """
        if not _OWNER.match(owner):
            raise ValueError(f"invalid owner {owner!r}")
        job_id = uuid.uuid4().hex
        now_dt = datetime.now(UTC)
        now = now_dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        stream = spec.get("stream") or {}
        training = spec.get("training") or {}
        record: dict[str, Any] = {
            "id": job_id,
            "owner": owner,
            "spec": spec,
            "status": QUEUED,
            "queue": queue,
            "created_at": now,
            "started_at": None,
            "finished_at": None,
            "updated_at": now,
            "error": None,
            "attempt": 0,
            "progress": {
                "megabatch": 0,
                "megabatches": stream.get("megabatches"),
                "epoch": 0,
                "epochs": training.get("epochs"),
                "fraction": 0.0,
            },
            "latest_metrics": None,
            "result": None,
            "artifacts": [],
            "cancel_requested": False,
        }
        pairs: list[str] = []
        for name in JOB_FIELDS:
            pairs += [name, _dumps(record[name])]
        score = int(now_dt.timestamp() * 1000)
        ok = self._create(
            keys=[self.job_key(job_id), self._owner_key(owner), self._active_key(owner), self._status_key(QUEUED)],
            args=[job_id, score, -1 if max_active is None else max_active, *pairs],
        )
        if not ok:
            raise TooManyActiveJobs(f"{owner} already has {max_active} queued or running jobs")
        log.info("job %s created for %s on queue %s", job_id, owner, queue)
        return json.loads(_dumps(record))

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        if not is_job_id(job_id):
            return None
        raw = self.redis.hgetall(self.job_key(job_id))
        return self._decode_record(raw)

    def cancel_requested(self, job_id: str) -> bool | None:
        """The job's cancel flag, read with one HGET (workers poll it every epoch); None when the
        job does not exist."""
        if not is_job_id(job_id):
            return None
        raw = self.redis.hget(self.job_key(job_id), "cancel_requested")
        return None if raw is None else bool(json.loads(raw))

    @staticmethod
    def _decode_record(raw: dict[str, str]) -> dict[str, Any] | None:
        if not raw or "status" not in raw:
            return None
        return {name: json.loads(raw[name]) if name in raw else None for name in JOB_FIELDS}

    def get_jobs(self, job_ids: Iterable[str]) -> list[dict[str, Any]]:
        """The records of ``job_ids`` that exist, in the given order (one round trip)."""
        ids = [i for i in job_ids if is_job_id(i)]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.job_key(job_id))
        records = [self._decode_record(raw) for raw in pipe.execute()] if ids else []
        return [r for r in records if r is not None]

    def job_ids_with_status(self, status: str) -> set[str]:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        return set(self.redis.smembers(self._status_key(status)))

    def list_jobs(
        self,
        owner: str,
        *,
        status: str | None = None,
        cursor: str | None = None,
        limit: int = 20,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """``owner``'s jobs newest first, optionally only those with ``status``.

        ``cursor`` is the opaque ``next_cursor`` of the previous page; it encodes the (created ms,
        id) of the last job returned, so pages stay stable while new jobs arrive.
        """
        if limit < 1:
            raise ValueError("limit must be positive")
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        after: tuple[float, str] | None = self._decode_cursor(cursor) if cursor else None
        if not _OWNER.match(owner):
            return [], None
        key = self._owner_key(owner)
        max_score: float | str = after[0] if after else "+inf"
        found: list[tuple[float, dict[str, Any]]] = []
        offset = 0
        batch = max(2 * limit, 50)
        # One more than asked tells whether a next page exists.
        while len(found) <= limit:
            rows = self.redis.zrevrangebyscore(key, max_score, "-inf", start=offset, num=batch, withscores=True)
            if not rows:
                break
            offset += len(rows)
            exhausted = len(rows) < batch
            # Equal scores come in reverse member order, so after (s, id) come members < id.
            rows = [(m, s) for m, s in rows if not (after and s == after[0] and m >= after[1])]
            pipe = self.redis.pipeline(transaction=False)
            for member, _ in rows:
                pipe.hgetall(self.job_key(member))
            for (_, score), raw in zip(rows, pipe.execute(), strict=True):
                record = self._decode_record(raw)
                if record is None or (status is not None and record["status"] != status):
                    continue
                found.append((score, record))
                if len(found) > limit:
                    break
            if exhausted:
                break
        next_cursor = None
        if len(found) > limit:
            found = found[:limit]
            last_score, last = found[-1]
            next_cursor = self._encode_cursor(last_score, last["id"])
        return [record for _, record in found], next_cursor

    @staticmethod
    def _encode_cursor(score: float, job_id: str) -> str:
        blob = json.dumps([int(score), job_id], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(blob).decode().rstrip("=")

    @staticmethod
    def _decode_cursor(cursor: str) -> tuple[float, str]:
        try:
            padded = cursor + "=" * (-len(cursor) % 4)
            score, job_id = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
            if not isinstance(score, int) or not isinstance(job_id, str) or not is_job_id(job_id):
                raise ValueError("bad cursor content")
            return float(score), job_id
        except (ValueError, TypeError, OverflowError, UnicodeError, binascii.Error) as exc:
            raise InvalidCursor("invalid cursor") from exc

    def transition(
        self,
        job_id: str,
        to_status: str,
        *,
        reason: str | None = None,
        allowed_from: Iterable[str],
    ) -> bool:
        """Move the job to ``to_status`` if its status is one of ``allowed_from``; atomic.

        Sets ``started_at`` on the first move to running, ``finished_at`` on a terminal status,
        ``error`` = ``reason`` on ``failed``, and appends a ``status_changed`` event. Terminal
        statuses never change. Returns False (and changes nothing) otherwise.
        """
        if to_status not in STATUSES:
            raise ValueError(f"unknown status {to_status!r}")
        allowed = set(allowed_from)
        if unknown := allowed - set(STATUSES):
            raise ValueError(f"unknown statuses {sorted(unknown)}")
        if not is_job_id(job_id) or not allowed:
            return False
        event = _dumps({"type": "status_changed", "status": to_status, "reason": reason})
        error = _dumps(reason) if to_status == "failed" else ""
        done = self._transition(
            keys=[self.job_key(job_id), self.events_key(job_id)],
            args=[
                self.prefix,
                job_id,
                to_status,
                _dumps(utc_now()),
                self.events_maxlen,
                event,
                error,
                ",".join(sorted(allowed)),
            ],
        )
        if done:
            log.info("job %s -> %s%s", job_id, to_status, f" ({reason})" if reason else "")
        return bool(done)

    def request_cancel(self, job_id: str) -> dict[str, Any] | None:
        """Ask the job to stop: a queued job is cancelled at once, a running one becomes
        ``cancelling`` (the worker stops at the next epoch and moves it to ``cancelled``); a
        terminal job is left as it is. Returns the record afterwards, None if there is no job."""
        if not is_job_id(job_id):
            return None
        self._cancel(
            keys=[self.job_key(job_id), self.events_key(job_id)],
            args=[
                self.prefix,
                job_id,
                _dumps(utc_now()),
                self.events_maxlen,
                _dumps({"type": "status_changed", "status": CANCELLED, "reason": "cancelled before it started"}),
                _dumps({"type": "status_changed", "status": CANCELLING, "reason": "cancel requested"}),
            ],
        )
        return self.get_job(job_id)

    def append_event(self, job_id: str, event: dict[str, Any]) -> str | None:
        """Append ``event`` (``{"type": ..., ...}``) to the job's stream; returns the entry id.

        Also keeps the record's ``progress`` / ``latest_metrics`` and the metric histories up to
        date. A ``megabatch_ended`` for a megabatch already recorded (a redelivered job replaying
        it) is dropped and returns None, as does any event for a job that does not exist.
        """
        kind = event.get("type")
        if not isinstance(kind, str) or not kind:
            raise ValueError("an event needs a 'type'")
        if not is_job_id(job_id):
            return None
        raw_progress = self.redis.hget(self.job_key(job_id), "progress")
        if raw_progress is None:
            return None
        progress = dict(json.loads(raw_progress) or {})
        mode, hfield, hvalue, history_key = "", "", "", self._megabatches_key(job_id)
        updates: dict[str, Any] = {}
        if kind == "run_started":
            total = int(event.get("megabatches") or progress.get("megabatches") or 1)
            done = int(event.get("resumed_after") or 0)
            progress.update(megabatches=total, epochs=event.get("epochs", progress.get("epochs")))
            progress.update(megabatch=done, epoch=0, fraction=done / total)
        elif kind == "epoch_ended":
            m, e = int(event["megabatch"]), int(event["epoch"])
            epochs = int(event.get("epochs") or progress.get("epochs") or e)
            total = int(progress.get("megabatches") or m)
            # Megabatches 1..m-1 are done and megabatch m is e/epochs done.
            progress.update(megabatch=m, epoch=e, epochs=epochs, fraction=((m - 1) + e / epochs) / total)
            mode, history_key, hfield = "set", self._epochs_key(job_id), f"{m}:{e}"
            hvalue = _dumps({k: v for k, v in event.items() if k != "type"})
        elif kind == "megabatch_ended":
            m = int(event["megabatch"])
            total = int(event.get("megabatches") or progress.get("megabatches") or m)
            metrics = dict(event.get("metrics") or {})
            metrics.setdefault("megabatch", m)
            progress.update(megabatch=m, megabatches=total, epoch=progress.get("epochs") or 0, fraction=m / total)
            mode, hfield, hvalue = "nx", str(m), _dumps(metrics)
            updates["latest_metrics"] = metrics
        if kind in ("run_started", "epoch_ended", "megabatch_ended"):
            progress["fraction"] = round(min(1.0, max(0.0, float(progress["fraction"]))), 6)
            updates["progress"] = progress
        updates["updated_at"] = utc_now()
        pairs: list[str] = []
        for name, value in updates.items():
            pairs += [name, _dumps(value)]
        entry_id = self._append(
            keys=[self.job_key(job_id), self.events_key(job_id), history_key],
            args=[self.events_maxlen, kind, _dumps(event), mode, hfield, hvalue, *pairs],
        )
        return entry_id or None

    def read_events(
        self, job_id: str, after: str = "0-0", block_ms: int | None = None, count: int = 100
    ) -> list[tuple[str, dict[str, Any]]]:
        """Events after stream id ``after`` (oldest first), at most ``count``.

        ``block_ms`` waits that long for new entries; the client's socket timeout must be longer.
        """
        if not is_job_id(job_id):
            return []
        reply = self.redis.xread({self.events_key(job_id): after}, count=count, block=block_ms)
        out: list[tuple[str, dict[str, Any]]] = []
        for _stream, entries in reply or []:
            out += [(entry_id, decode_entry(fields)) for entry_id, fields in entries]
        return out

    def history(self, job_id: str) -> dict[str, list[dict[str, Any]]]:
        """Per-megabatch metrics (by megabatch) and per-epoch metrics (by megabatch, epoch)."""
        if not is_job_id(job_id):
            return {"megabatches": [], "epochs": []}
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self._megabatches_key(job_id))
        pipe.hgetall(self._epochs_key(job_id))
        mb_raw, ep_raw = pipe.execute()
        megabatches = [json.loads(mb_raw[k]) for k in sorted(mb_raw, key=int)]
        epochs = [json.loads(ep_raw[k]) for k in sorted(ep_raw, key=lambda k: tuple(map(int, k.split(":"))))]
        return {"megabatches": megabatches, "epochs": epochs}

    def set_result(self, job_id: str, result: dict[str, Any], artifacts: list[dict[str, Any]]) -> None:
        """Store the run's result and its artifact list (``{name, format, bytes, sha256}``)."""
        if not is_job_id(job_id) or not self._hset_existing(
            keys=[self.job_key(job_id)],
            args=["result", _dumps(result), "artifacts", _dumps(artifacts), "updated_at", _dumps(utc_now())],
        ):
            raise JobNotFound(job_id)

    def next_attempt(self, job_id: str) -> int:
        """Increment and return the job's attempt counter (1 on the first delivery)."""
        value = self._next_attempt(keys=[self.job_key(job_id)]) if is_job_id(job_id) else -1
        if value < 0:
            raise JobNotFound(job_id)
        return int(value)

    def delete_job(self, job_id: str) -> bool:
        """Remove the record, its events, histories, lease and index entries. The caller removes
        the artifacts folder. Returns False if there was no such job."""
        job = self.get_job(job_id)
        if job is None:
            return False
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(
            self.job_key(job_id),
            self.events_key(job_id),
            self._megabatches_key(job_id),
            self._epochs_key(job_id),
            self._lease_key(job_id),
        )
        pipe.zrem(self._owner_key(job["owner"]), job_id)
        pipe.srem(self._active_key(job["owner"]), job_id)
        for status in STATUSES:
            pipe.srem(self._status_key(status), job_id)
        pipe.execute()
        log.info("job %s deleted", job_id)
        return True

    def running_jobs(self) -> list[str]:
        """Ids of jobs a worker is executing or should be: status ``running`` or ``cancelling``
        (a cancelling job whose worker died still needs someone to finish it as cancelled)."""
        return sorted(self.redis.sunion(self._status_key(RUNNING), self._status_key(CANCELLING)))

    def count_by_status(self) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        for status in STATUSES:
            pipe.scard(self._status_key(status))
        return dict(zip(STATUSES, (int(n) for n in pipe.execute()), strict=True))

    def count_active(self, owner: str) -> int:
        """The owner's queued, running and cancelling jobs."""
        return int(self.redis.scard(self._active_key(owner))) if _OWNER.match(owner) else 0

    def ping(self) -> bool:
        """True when Redis answers; raises redis.exceptions.ConnectionError/TimeoutError otherwise."""
        return bool(self.redis.ping())

    # --- leases -------------------------------------------------------------------------------
    def acquire_lease(self, job_id: str, token: str, ttl_s: float) -> bool:
        """Take the job's lease unless another live token holds it."""
        return bool(self.redis.set(self._lease_key(job_id), token, nx=True, px=max(1, int(ttl_s * 1000))))

    def renew_lease(self, job_id: str, token: str, ttl_s: float) -> bool:
        """Extend the lease if ``token`` still holds it; False means it was lost."""
        return bool(self._renew(keys=[self._lease_key(job_id)], args=[token, max(1, int(ttl_s * 1000))]))

    def release_lease(self, job_id: str, token: str) -> None:
        self._release(keys=[self._lease_key(job_id)], args=[token])

    def lease_alive(self, job_id: str) -> bool:
        return bool(self.redis.exists(self._lease_key(job_id)))

    # --- idempotency (API) --------------------------------------------------------------------
    def reserve_idempotency(
        self, owner: str, key: str, fingerprint: str, ttl_s: int
    ) -> dict[str, Any] | None:
        """Claim ``key`` for a request whose body hashes to ``fingerprint``.

        Returns None when this call claimed it (go ahead, then :meth:`complete_idempotency` or
        :meth:`release_idempotency`), else the existing record ``{fingerprint, response}``
        (``response`` is None while the first request is still being handled).
        """
        if not _IDEM_KEY.match(key):
            raise ValueError("invalid idempotency key")
        record = {"fingerprint": fingerprint, "response": None}
        name = self._idem_key(owner, key)
        if self.redis.set(name, _dumps(record), nx=True, ex=ttl_s):
            return None
        raw = self.redis.get(name)
        if raw is None:  # expired between the two calls: claim again
            return self.reserve_idempotency(owner, key, fingerprint, ttl_s)
        stored: dict[str, Any] = json.loads(raw)
        return stored

    def complete_idempotency(
        self, owner: str, key: str, fingerprint: str, response: dict[str, Any], ttl_s: int
    ) -> None:
        """Remember the first answer so that a retry with the same key replays it."""
        record = {"fingerprint": fingerprint, "response": response}
        self.redis.set(self._idem_key(owner, key), _dumps(record), ex=ttl_s)

    def release_idempotency(self, owner: str, key: str) -> None:
        """Forget a claim whose request failed, so the client may retry with the same key."""
        self.redis.delete(self._idem_key(owner, key))

    # --- API keys -----------------------------------------------------------------------------
    def create_key(self, name: str) -> tuple[str, str]:
        """A new API key; returns (key_id, secret). Only sha256(secret) is stored, so the secret
        is shown once. The key id is the owner of the jobs created with it."""
        key_id = f"key_{secrets.token_hex(8)}"
        secret = f"ap_{secrets.token_urlsafe(32)}"
        record = {"key_id": key_id, "name": name, "created_at": utc_now()}
        self.redis.hset(self._keys_key, hash_secret(secret), _dumps(record))
        log.info("API key %s (%s) created", key_id, name)
        return key_id, secret

    def owner_for_secret(self, secret: str) -> str | None:
        raw = self.redis.hget(self._keys_key, hash_secret(secret))
        return json.loads(raw)["key_id"] if raw else None

    def revoke_key(self, key_id: str) -> bool:
        for digest, raw in self.redis.hgetall(self._keys_key).items():
            if json.loads(raw)["key_id"] == key_id:
                return bool(self.redis.hdel(self._keys_key, digest))
        return False

    def list_keys(self) -> list[dict[str, Any]]:
        """Key records ``{key_id, name, created_at}``, oldest first; never the secret."""
        records = [json.loads(raw) for raw in self.redis.hgetall(self._keys_key).values()]
        return sorted(records, key=lambda r: (r["created_at"], r["key_id"]))
