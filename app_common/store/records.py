"""Job records: create, read, list, move through their statuses, delete.

Every multi-key change is one Lua script, so readers never see half an update and two deliveries
of the same job cannot both win a status change.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, cast

from app_common.events import CANCELLED, CANCELLING, FAILED, QUEUED, RUNNING, STATUSES, StatusChanged, event_to_dict
from app_common.jobs import JOB_FIELDS, ArtifactInfo, JobRecord, MlflowRun, Notify, Progress, Tracking
from app_common.store._common import (
    OWNER,
    JobNotFound,
    StoreBase,
    TooManyActiveJobs,
    decode_cursor,
    dumps,
    format_time,
    is_job_id,
    utc_now,
)
from app_common.store.webhooks import ENQUEUE_WEBHOOK_LUA, now_ms
from app_common.webhooks import new_message_id

log = logging.getLogger(__name__)

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
    + ENQUEUE_WEBHOOK_LUA
    + """
-- KEYS: job, events
-- ARGV: prefix, id, to, now (JSON), maxlen, event JSON, error JSON ('' = keep), allowed (comma list),
--       webhook-id, now ms (a delivery of 'started' on the first move to running, of 'completed'
--       on a terminal move, when the job's notify asks for it)
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
local first_start = false
if ARGV[3] == 'running' and redis.call('HGET', KEYS[1], 'started_at') == 'null' then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[4])
  first_start = true
end
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[7]) end
move(ARGV[1], ARGV[2], owner, cur, ARGV[3], ARGV[4], ARGV[5], KEYS[2], ARGV[6])
if terminal[ARGV[3]] then
  enqueue_webhook(ARGV[1], ARGV[2], 'completed', ARGV[9], ARGV[10], cjson.decode(ARGV[4]), '')
elseif first_start then
  enqueue_webhook(ARGV[1], ARGV[2], 'started', ARGV[9], ARGV[10], cjson.decode(ARGV[4]), '')
end
return 1
"""
)

_CANCEL = (
    _TERMINAL_LUA
    + _MOVE_LUA
    + ENQUEUE_WEBHOOK_LUA
    + """
-- KEYS: job, events
-- ARGV: prefix, id, now (JSON), maxlen, event JSON for queued->cancelled, event JSON for ->cancelling,
--       webhook-id, now ms (a 'completed' delivery for queued->cancelled)
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw then return -1 end
local cur = cjson.decode(raw)
if terminal[cur] then return 0 end
redis.call('HSET', KEYS[1], 'cancel_requested', 'true', 'updated_at', ARGV[3])
local owner = cjson.decode(redis.call('HGET', KEYS[1], 'owner'))
if cur == 'queued' then
  move(ARGV[1], ARGV[2], owner, cur, 'cancelled', ARGV[3], ARGV[4], KEYS[2], ARGV[5])
  enqueue_webhook(ARGV[1], ARGV[2], 'completed', ARGV[7], ARGV[8], cjson.decode(ARGV[3]), '')
elseif cur == 'running' then
  move(ARGV[1], ARGV[2], owner, cur, 'cancelling', ARGV[3], ARGV[4], KEYS[2], ARGV[6])
end
return 1
"""
)

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


def _status_event(status: str, reason: str | None) -> str:
    return dumps(event_to_dict(StatusChanged(status=status, reason=reason)))


def decode_record(raw: dict[str, str]) -> JobRecord | None:
    """The record of a job hash; None for a missing (or half-deleted) one."""
    if not raw or "status" not in raw:
        return None
    return JobRecord.model_validate({name: json.loads(raw[name]) for name in JOB_FIELDS if name in raw})


class RecordOps(StoreBase):
    def create_job(
        self,
        owner: str,
        spec: dict[str, Any],
        *,
        queue: str,
        max_active: int | None = None,
        notify: Notify | None = None,
        tracking: Tracking | None = None,
    ) -> JobRecord:
        """Write a new job with status ``queued``; returns its record.

        With ``max_active``, raises :class:`TooManyActiveJobs` (atomically, so concurrent
        submissions cannot overshoot) when ``owner`` already has that many non-terminal jobs.
        """
        if not OWNER.match(owner):
            raise ValueError(f"invalid owner {owner!r}")
        job_id = uuid.uuid4().hex
        now_dt = datetime.now(UTC)
        # Stored with millisecond precision: the record returned equals the one read back.
        now_dt = now_dt.replace(microsecond=now_dt.microsecond // 1000 * 1000)
        now = format_time(now_dt)
        record = JobRecord(
            id=job_id, owner=owner, spec=json.loads(dumps(spec)), status=QUEUED, queue=queue,
            created_at=now_dt, started_at=None, finished_at=None, updated_at=now_dt, error=None, attempt=0,
            progress=Progress.initial(spec), latest_metrics=None, result=None, artifacts=[], cancel_requested=False,
            notify=notify, tracking=tracking,
        )
        stored = record.model_dump(mode="json") | {"created_at": now, "updated_at": now}
        pairs: list[str] = []
        for name in JOB_FIELDS:
            pairs += [name, dumps(stored[name])]
        score = int(now_dt.timestamp() * 1000)
        ok = self._script(_CREATE)(
            keys=[self.names.job(job_id), self.names.owner_jobs(owner), self.names.owner_active(owner),
                  self.names.status(QUEUED)],
            args=[job_id, score, -1 if max_active is None else max_active, *pairs],
        )
        if not ok:
            raise TooManyActiveJobs(f"{owner} already has {max_active} queued or running jobs")
        log.info("job %s created for %s on queue %s", job_id, owner, queue)
        return record

    def get_job(self, job_id: str) -> JobRecord | None:
        if not is_job_id(job_id):
            return None
        return decode_record(cast(dict[str, str], self.redis.hgetall(self.names.job(job_id))))

    def cancel_requested(self, job_id: str) -> bool | None:
        """The job's cancel flag, read with one HGET (workers poll it every epoch); None when the
        job does not exist."""
        if not is_job_id(job_id):
            return None
        raw = self.redis.hget(self.names.job(job_id), "cancel_requested")
        return None if raw is None else bool(json.loads(raw))

    def get_jobs(self, job_ids: Iterable[str]) -> list[JobRecord]:
        """The records of ``job_ids`` that exist, in the given order (one round trip)."""
        ids = [i for i in job_ids if is_job_id(i)]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.names.job(job_id))
        records = [decode_record(raw) for raw in pipe.execute()] if ids else []
        return [r for r in records if r is not None]

    def job_ids_with_status(self, status: str) -> set[str]:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        return cast(set[str], self.redis.smembers(self.names.status(status)))

    def list_jobs(
        self,
        owner: str,
        *,
        status: str | None = None,
        cursor: str | None = None,
        limit: int = 20,
    ) -> tuple[list[JobRecord], str | None]:
        """``owner``'s jobs newest first, optionally only those with ``status``.

        ``cursor`` is the opaque ``next_cursor`` of the previous page; it encodes the (created ms,
        id) of the last job returned, so pages stay stable while new jobs arrive.
        """
        if limit < 1:
            raise ValueError("limit must be positive")
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        if not OWNER.match(owner):
            if cursor:
                decode_cursor(cursor)
            return [], None
        return self._newest_first(
            self.names.owner_jobs(owner), decode_record, self.names.job,
            keep=lambda record: status is None or record.status == status, cursor=cursor, limit=limit,
        )

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
        statuses never change. Returns False (and changes nothing) otherwise. In the same script,
        queues the webhook the job's ``notify`` asks for: ``started`` on the first move to running
        only (a resume after a lost worker sends none), ``completed`` on any terminal status.
        """
        if to_status not in STATUSES:
            raise ValueError(f"unknown status {to_status!r}")
        allowed = set(allowed_from)
        if unknown := allowed - set(STATUSES):
            raise ValueError(f"unknown statuses {sorted(unknown)}")
        if not is_job_id(job_id) or not allowed:
            return False
        error = dumps(reason) if to_status == FAILED else ""
        done = self._script(_TRANSITION)(
            keys=[self.names.job(job_id), self.names.events(job_id)],
            args=[
                self.prefix,
                job_id,
                to_status,
                dumps(utc_now()),
                self.events_maxlen,
                _status_event(to_status, reason),
                error,
                ",".join(sorted(allowed)),
                new_message_id(),
                now_ms(),
            ],
        )
        if done:
            log.info("job %s -> %s%s", job_id, to_status, f" ({reason})" if reason else "")
        return bool(done)

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Ask the job to stop: a queued job is cancelled at once, a running one becomes
        ``cancelling`` (the worker stops at the next epoch and moves it to ``cancelled``); a
        terminal job is left as it is. Returns the record afterwards, None if there is no job."""
        if not is_job_id(job_id):
            return None
        self._script(_CANCEL)(
            keys=[self.names.job(job_id), self.names.events(job_id)],
            args=[
                self.prefix,
                job_id,
                dumps(utc_now()),
                self.events_maxlen,
                _status_event(CANCELLED, "cancelled before it started"),
                _status_event(CANCELLING, "cancel requested"),
                new_message_id(),
                now_ms(),
            ],
        )
        return self.get_job(job_id)

    def set_result(self, job_id: str, result: dict[str, Any], artifacts: list[ArtifactInfo]) -> None:
        """Store the run's result and its artifact list."""
        listed = [a.model_dump(mode="json") for a in artifacts]
        if not is_job_id(job_id) or not self._script(_IF_EXISTS_HSET)(
            keys=[self.names.job(job_id)],
            args=["result", dumps(result), "artifacts", dumps(listed), "updated_at", dumps(utc_now())],
        ):
            raise JobNotFound(job_id)

    def set_mlflow_run(self, job_id: str, run: MlflowRun) -> bool:
        """Record the MLflow run that tracks the job; False when there is no such job (never
        creates a record for a deleted one)."""
        if not is_job_id(job_id):
            return False
        return bool(self._script(_IF_EXISTS_HSET)(
            keys=[self.names.job(job_id)],
            args=["mlflow", dumps(run.model_dump(mode="json")), "updated_at", dumps(utc_now())],
        ))

    def next_attempt(self, job_id: str) -> int:
        """Increment and return the job's attempt counter (1 on the first delivery)."""
        value = self._script(_NEXT_ATTEMPT)(keys=[self.names.job(job_id)]) if is_job_id(job_id) else -1
        if value < 0:
            raise JobNotFound(job_id)
        return int(value)

    def delete_job(self, job_id: str) -> bool:
        """Remove the record, its events, histories, lease and index entries. The caller removes
        the artifacts folder. Returns False if there was no such job."""
        job = self.get_job(job_id)
        if job is None:
            return False
        names = self.names
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(
            names.job(job_id), names.events(job_id), names.megabatches(job_id), names.epochs(job_id),
            names.lease(job_id), names.deliveries(job_id),
        )
        pipe.zrem(names.owner_jobs(job.owner), job_id)
        pipe.srem(names.owner_active(job.owner), job_id)
        for status in STATUSES:
            pipe.srem(names.status(status), job_id)
        pipe.execute()
        log.info("job %s deleted", job_id)
        return True

    def running_jobs(self) -> list[str]:
        """Ids of jobs a worker is executing or should be: status ``running`` or ``cancelling``
        (a cancelling job whose worker died still needs someone to finish it as cancelled)."""
        members = cast(set[str], self.redis.sunion([self.names.status(RUNNING), self.names.status(CANCELLING)]))
        return sorted(members)

    def count_by_status(self) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        for status in STATUSES:
            pipe.scard(self.names.status(status))
        return dict(zip(STATUSES, (int(n) for n in pipe.execute()), strict=True))

    def count_active(self, owner: str) -> int:
        """The owner's queued, running and cancelling jobs."""
        return int(self.redis.scard(self.names.owner_active(owner))) if OWNER.match(owner) else 0
