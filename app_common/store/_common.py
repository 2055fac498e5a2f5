"""What every part of the store shares: the key layout, the JSON encoding and the Redis client.

Key layout under the prefix ``p`` (see docs/SERVICE_CONTRACTS.md)::

    {p}:job:{id}                 hash   each field JSON-encoded (see app_common.jobs.JobRecord)
    {p}:job:{id}:events          stream entries {type, data: JSON event}, trimmed (MAXLEN ~)
    {p}:job:{id}:megabatches     hash   megabatch index -> metrics JSON (HSETNX: first write wins)
    {p}:job:{id}:epochs          hash   "{megabatch}:{epoch}" -> epoch_ended JSON
    {p}:job:{id}:lease           string lease token, PX expiry
    {p}:job:{id}:reaped          string the reaper re-enqueued the job (PX: one window)
    {p}:owner:{owner}:jobs       zset   job ids, score = created time in ms
    {p}:owner:{owner}:active     set    the owner's non-terminal job ids (concurrency limit)
    {p}:jobs:status:{status}     set    job ids per status
    {p}:idem:{owner}:{key}       string Idempotency-Key record JSON, with a TTL
    {p}:keys                     hash   sha256(secret) -> API key record JSON
    {p}:dataset:{id}             hash   each field JSON-encoded (see app_common.datasets.DatasetRecord)
    {p}:owner:{owner}:datasets   zset   dataset ids, score = created time in ms
    {p}:dispatch:{queue}:owner:{owner}  list  the owner's queued job ids, oldest first (fair dispatch)
    {p}:dispatch:{queue}:ready   zset   owners with queued work, score = turn of their last dispatch
    {p}:dispatch:{queue}:served  hash   owner -> turn of their last dispatch
    {p}:dispatch:{queue}:turn    string dispatch counter of the queue
    {p}:dispatch:sent            zset   job ids handed to a worker, score = ms (until the job starts)
    {p}:ratelimit:...            the `limits` library's counters (API submission rate limit)
    {p}:webhook:secrets          hash   owner (API key id) -> webhook signing secret (whsec_...)
    {p}:webhook:msg:{msg_id}     hash   one pending webhook delivery (see app_common.store.webhooks)
    {p}:webhook:due              zset   pending delivery ids, score = next attempt time in ms
    {p}:webhook:claimed          zset   delivery ids a courier holds, score = claim expiry in ms
    {p}:webhook:queued           zset   pending delivery ids, score = when queued in ms (their deadlines)
    {p}:job:{id}:deliveries      list   the job's delivery attempts (JSON), newest first, bounded
    {p}:streams:{owner}          zset   the key's open event streams (slot ids), score = lease end in ms
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

# Job ids are uuid4 hex; anything else is not a job (and must never reach a Redis key name).
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
OWNER = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
IDEM_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


class JobNotFound(KeyError):
    """The job does not exist (never created, or deleted)."""


class TooManyActiveJobs(RuntimeError):
    """The owner already has the maximum number of queued or running jobs."""


class InvalidCursor(ValueError):
    """A pagination cursor that this store did not issue."""


def utc_now() -> str:
    """ISO 8601 UTC timestamp with milliseconds, e.g. ``2025-01-31T12:00:00.123Z``."""
    return format_time(datetime.now(UTC))


def format_time(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    return bool(JOB_ID.match(value))


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


def dumps(value: Any) -> str:
    return json.dumps(json_safe(value), separators=(",", ":"), allow_nan=False)


def decode_entry(fields: dict[str, str]) -> dict[str, Any]:
    """The event dict of one stream entry (its fields are ``{"type": ..., "data": JSON}``)."""
    data = fields.get("data")
    event: dict[str, Any] = json.loads(data) if data else {}
    event.setdefault("type", fields.get("type", "unknown"))
    return event


@dataclass(frozen=True)
class KeyNames:
    """The Redis key names under one prefix (the layout in this module's docstring)."""

    prefix: str

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def megabatches(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:megabatches"

    def epochs(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:epochs"

    def lease(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:lease"

    def reaped(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:reaped"

    def owner_jobs(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:jobs"

    def owner_active(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:active"

    def status(self, status: str) -> str:
        return f"{self.prefix}:jobs:status:{status}"

    def idempotency(self, owner: str, key: str) -> str:
        return f"{self.prefix}:idem:{owner}:{key}"

    @property
    def api_keys(self) -> str:
        return f"{self.prefix}:keys"

    def dataset(self, dataset_id: str) -> str:
        return f"{self.prefix}:dataset:{dataset_id}"

    def owner_datasets(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:datasets"

    def dispatch_owner(self, queue: str, owner: str) -> str:
        return f"{self.prefix}:dispatch:{queue}:owner:{owner}"

    def dispatch_ready(self, queue: str) -> str:
        return f"{self.prefix}:dispatch:{queue}:ready"

    def dispatch_served(self, queue: str) -> str:
        return f"{self.prefix}:dispatch:{queue}:served"

    def dispatch_turn(self, queue: str) -> str:
        return f"{self.prefix}:dispatch:{queue}:turn"

    @property
    def dispatch_sent(self) -> str:
        return f"{self.prefix}:dispatch:sent"

    @property
    def webhook_secrets(self) -> str:
        return f"{self.prefix}:webhook:secrets"

    def webhook_message(self, msg_id: str) -> str:
        return f"{self.prefix}:webhook:msg:{msg_id}"

    @property
    def webhook_due(self) -> str:
        return f"{self.prefix}:webhook:due"

    @property
    def webhook_claimed(self) -> str:
        return f"{self.prefix}:webhook:claimed"

    @property
    def webhook_queued(self) -> str:
        return f"{self.prefix}:webhook:queued"

    def deliveries(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:deliveries"

    def stream_slots(self, owner: str) -> str:
        return f"{self.prefix}:streams:{owner}"

    @property
    def rate_limits(self) -> str:
        """The key prefix under which the ``limits`` library keeps its counters."""
        return f"{self.prefix}:ratelimit"


T = TypeVar("T")


class StoreBase:
    """The state each part of :class:`app_common.store.JobStore` uses: one client, one prefix.

    Keys built inside the Lua scripts from the prefix are fine on a single Redis (our deployment)
    and keep each change atomic; a Redis Cluster would need hash tags.
    """

    redis: redis.Redis
    prefix: str
    names: KeyNames
    events_maxlen: int
    _scripts: dict[str, Script]

    def _script(self, source: str) -> Script:
        """The registered script of ``source`` (registered once per store; EVALSHA afterwards)."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.redis.register_script(source)
        return script

    def _newest_first(
        self,
        index: str,
        load: Callable[[dict[str, str]], T | None],
        hash_key: Callable[[str], str],
        *,
        keep: Callable[[T], bool],
        cursor: str | None,
        limit: int,
    ) -> tuple[list[T], str | None]:
        """One page of the records whose ids the zset ``index`` scores by creation time (ms),
        newest first, only those ``keep`` accepts (``load`` gives None for a vanished one).

        ``cursor`` is the opaque ``next_cursor`` of the previous page; it encodes the (score, id)
        of the last record returned, so pages stay stable while new records arrive. Raises
        :class:`InvalidCursor` for a cursor this store did not issue.
        """
        if limit < 1:
            raise ValueError("limit must be positive")
        after = decode_cursor(cursor) if cursor else None
        max_score: float | str = after[0] if after else "+inf"
        found: list[tuple[float, str, T]] = []
        offset = 0
        batch = max(2 * limit, 50)
        # One more than asked tells whether a next page exists.
        while len(found) <= limit:
            rows = cast(
                list[tuple[str, float]],
                self.redis.zrevrangebyscore(index, max_score, "-inf", start=offset, num=batch, withscores=True),
            )
            if not rows:
                break
            offset += len(rows)
            exhausted = len(rows) < batch
            # Equal scores come in reverse member order, so after (s, id) come members < id.
            rows = [(m, s) for m, s in rows if not (after and s == after[0] and m >= after[1])]
            pipe = self.redis.pipeline(transaction=False)
            for member, _ in rows:
                pipe.hgetall(hash_key(member))
            for (member, score), raw in zip(rows, pipe.execute(), strict=True):
                record = load(raw)
                if record is None or not keep(record):
                    continue
                found.append((score, member, record))
                if len(found) > limit:
                    break
            if exhausted:
                break
        next_cursor = None
        if len(found) > limit:
            found = found[:limit]
            last_score, last_id, _ = found[-1]
            next_cursor = encode_cursor(last_score, last_id)
        return [record for _, _, record in found], next_cursor


def encode_cursor(score: float, record_id: str) -> str:
    blob = json.dumps([int(score), record_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(blob).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The (score, id) in a cursor of :func:`encode_cursor`; ids are uuid4 hex (jobs, datasets)."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        score, record_id = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        if not isinstance(score, int) or not isinstance(record_id, str) or not is_job_id(record_id):
            raise ValueError("bad cursor content")
        return float(score), record_id
    except (ValueError, TypeError, OverflowError, UnicodeError, binascii.Error) as exc:
        raise InvalidCursor("invalid cursor") from exc
