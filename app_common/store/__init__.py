"""The job store: job records, event streams, metric histories, leases, idempotency records, API
keys and dataset records in Redis.

The job record in Redis is the source of truth of a job's state (Celery only carries the job id).
The API writes records and reads them; the worker moves them through their lifecycle and appends
events. One module per concern, each with the Lua scripts it runs:

- :mod:`~app_common.store.records`: job records and their status transitions;
- :mod:`~app_common.store.events`: the event stream, metric histories and the async feed (SSE);
- :mod:`~app_common.store.leases`: worker leases and reaper claims;
- :mod:`~app_common.store.queues`: the per-key queues of fair dispatch;
- :mod:`~app_common.store.idempotency`: the API's Idempotency-Key records;
- :mod:`~app_common.store.api_keys`: API keys;
- :mod:`~app_common.store.datasets`: uploaded datasets' records and their status moves;
- :mod:`~app_common.store.webhooks`: webhook signing secrets, the delivery outbox and its claims;
- :mod:`~app_common.store._common`: the key layout, JSON encoding and the Redis client.

Nothing outside this package names a Redis key. Torch-free; the client must be created with
``decode_responses=True`` (see :func:`make_redis`).
"""

from __future__ import annotations

from collections.abc import Iterable

import redis
import redis.asyncio as aioredis

from app_common.jobs import JOB_FIELDS, JobRecord
from app_common.store._common import (
    InvalidCursor,
    JobNotFound,
    KeyNames,
    TooManyActiveJobs,
    decode_entry,
    is_job_id,
    json_safe,
    make_redis,
    parse_time,
    utc_now,
)
from app_common.store.api_keys import ApiKeyOps, hash_secret
from app_common.store.datasets import DatasetInUse, DatasetOps
from app_common.store.events import Entry, EventFeed, EventOps
from app_common.store.idempotency import IdempotencyOps
from app_common.store.leases import LeaseOps
from app_common.store.queues import QueueOps
from app_common.store.records import RecordOps
from app_common.store.webhooks import PendingDelivery, WebhookOps

__all__ = [
    "JOB_FIELDS",
    "DatasetInUse",
    "Entry",
    "EventFeed",
    "InvalidCursor",
    "JobNotFound",
    "JobStore",
    "KeyNames",
    "PendingDelivery",
    "TooManyActiveJobs",
    "decode_entry",
    "hash_secret",
    "is_job_id",
    "json_safe",
    "make_redis",
    "parse_time",
    "utc_now",
]


class JobStore(RecordOps, EventOps, LeaseOps, QueueOps, IdempotencyOps, ApiKeyOps, DatasetOps, WebhookOps):
    """Redis-backed jobs, events, leases, API keys and datasets. One instance per process; thread-safe (the
    redis client pools connections)."""

    def __init__(self, redis_client: redis.Redis, prefix: str = "app", events_maxlen: int = 10000):
        kwargs = redis_client.connection_pool.connection_kwargs
        if not kwargs.get("decode_responses"):
            raise ValueError("JobStore needs a Redis client created with decode_responses=True")
        self.redis = redis_client
        self.prefix = prefix
        self.names = KeyNames(prefix)
        self.events_maxlen = events_maxlen
        self._scripts = {}

    # Records as read carry ``stale`` (LeaseOps.with_staleness): one more round trip, only when a
    # job read is running or cancelling.
    def get_job(self, job_id: str) -> JobRecord | None:
        record = super().get_job(job_id)
        return None if record is None else self.with_staleness([record])[0]

    def get_jobs(self, job_ids: Iterable[str]) -> list[JobRecord]:
        return self.with_staleness(super().get_jobs(job_ids))

    def list_jobs(
        self, owner: str, *, status: str | None = None, cursor: str | None = None, limit: int = 20
    ) -> tuple[list[JobRecord], str | None]:
        records, next_cursor = super().list_jobs(owner, status=status, cursor=cursor, limit=limit)
        return self.with_staleness(records), next_cursor

    def job_key(self, job_id: str) -> str:
        return self.names.job(job_id)

    def events_key(self, job_id: str) -> str:
        return self.names.events(job_id)

    def event_feed(
        self, redis_url: str, job_id: str, *, block_s: float, timeout_s: float,
        pool: aioredis.ConnectionPool | None = None,
    ) -> EventFeed:
        """An async reader of ``job_id``'s events on a connection of its own, or borrowed from
        ``pool`` (a ``redis.asyncio`` connection pool; see :class:`EventFeed`)."""
        return EventFeed(redis_url, self.names, job_id, block_s=block_s, timeout_s=timeout_s, pool=pool)

    def celery_queue_length(self, queue: str, key_prefix: str = "") -> int:
        """Messages waiting in a Celery queue: its Redis transport keeps a queue as a list named
        ``{key_prefix}{queue}`` (``key_prefix`` is kombu's ``global_keyprefix``)."""
        return int(self.redis.llen(f"{key_prefix}{queue}"))

    def ping(self) -> bool:
        """True when Redis answers; raises redis.exceptions.ConnectionError/TimeoutError otherwise."""
        return bool(self.redis.ping())

    def close(self) -> None:
        self.redis.close()
