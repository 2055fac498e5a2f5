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
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

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
