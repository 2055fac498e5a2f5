"""Dataset records: create, read, list, move through their statuses, delete.

Status changes are compare-and-set Lua scripts, so two uploads (or an upload racing a delete)
cannot both win; a delete checks the owner's active jobs and removes the record in one script, so
no queued or running job ever loses its dataset's record to a delete that raced its check.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import cast

from app_common.datasets import (
    DATASET_FIELDS,
    DATASET_STATUSES,
    INVALID,
    READY,
    UPLOADING,
    VALIDATING,
    DatasetInfo,
    DatasetRecord,
    is_dataset_id,
)
from app_common.store._common import OWNER, StoreBase, dumps, format_time, utc_now
from app_common.store.records import decode_record

log = logging.getLogger(__name__)

_CREATE = """
-- KEYS: dataset, owner zset; ARGV: id, score, field1, value1, ...
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

_MOVE = """
-- KEYS: dataset; ARGV: to (JSON), now (JSON), allowed (comma list), then field/value pairs to set
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw then return 0 end
local cur = cjson.decode(raw)
local allowed = false
for s in string.gmatch(ARGV[3], '[^,]+') do
  if s == cur then allowed = true end
end
if not allowed then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[2])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

_DELETE = """
-- KEYS: dataset, owner zset, owner's active jobs set
-- ARGV: prefix, dataset id
-- Returns {0} when there is no dataset, {1} when deleted, {2, job ids...} when active jobs use it.
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local users = {}
for _, job_id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local raw = redis.call('HGET', ARGV[1] .. ':job:' .. job_id, 'spec')
  if raw then
    local ok, spec = pcall(cjson.decode, raw)
    if ok and type(spec) == 'table' and type(spec.dataset) == 'table' and spec.dataset.id == ARGV[2] then
      users[#users + 1] = job_id
    end
  end
end
if #users > 0 then
  table.sort(users)
  local out = {2}
  for _, job_id in ipairs(users) do out[#out + 1] = job_id end
  return out
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return {1}
"""


class DatasetInUse(RuntimeError):
    """Queued or running jobs name the dataset; ``job_ids`` lists them."""

    def __init__(self, dataset_id: str, job_ids: list[str]):
        super().__init__(f"dataset {dataset_id} is used by active jobs {', '.join(job_ids)}")
        self.job_ids = job_ids


def decode_dataset(raw: dict[str, str]) -> DatasetRecord | None:
    """The record of a dataset hash; None for a missing one."""
    if not raw or "status" not in raw:
        return None
    return DatasetRecord.model_validate({name: json.loads(raw[name]) for name in DATASET_FIELDS if name in raw})


def _spec_dataset_id(spec: object) -> str | None:
    dataset = spec.get("dataset") if isinstance(spec, dict) else None
    value = dataset.get("id") if isinstance(dataset, dict) else None
    return value if isinstance(value, str) else None


class DatasetOps(StoreBase):
    def create_dataset(self, owner: str, *, name: str, format: str, sha256: str, bytes: int) -> DatasetRecord:
        """Write a new dataset with status ``uploading``; returns its record (validated: a bad
        name, format, sha256 or size raises pydantic's ValidationError before anything is stored)."""
        if not OWNER.match(owner):
            raise ValueError(f"invalid owner {owner!r}")
        now_dt = datetime.now(UTC)
        # Stored with millisecond precision: the record returned equals the one read back.
        now_dt = now_dt.replace(microsecond=now_dt.microsecond // 1000 * 1000)
        record = DatasetRecord(
            id=uuid.uuid4().hex, owner=owner, name=name, format=format, status=UPLOADING,
            sha256=sha256, bytes=bytes, created_at=now_dt, updated_at=now_dt, error=None, info=None,
        )
        stored = record.model_dump(mode="json") | {"created_at": format_time(now_dt), "updated_at": format_time(now_dt)}
        pairs: list[str] = []
        for field in DATASET_FIELDS:
            pairs += [field, dumps(stored[field])]
        self._script(_CREATE)(
            keys=[self.names.dataset(record.id), self.names.owner_datasets(owner)],
            args=[record.id, int(now_dt.timestamp() * 1000), *pairs],
        )
        log.info("dataset %s (%s, %d bytes) created for %s", record.id, format, bytes, owner)
        return record

    def get_dataset(self, dataset_id: str) -> DatasetRecord | None:
        if not is_dataset_id(dataset_id):
            return None
        return decode_dataset(cast(dict[str, str], self.redis.hgetall(self.names.dataset(dataset_id))))

    def list_datasets(
        self, owner: str, *, status: str | None = None, cursor: str | None = None, limit: int = 20
    ) -> tuple[list[DatasetRecord], str | None]:
        """``owner``'s datasets newest first, optionally only those with ``status``; ``cursor`` as
        in :meth:`~app_common.store.records.RecordOps.list_jobs` (:class:`InvalidCursor`)."""
        if status is not None and status not in DATASET_STATUSES:
            raise ValueError(f"unknown dataset status {status!r}")
        index = self.names.owner_datasets(owner) if OWNER.match(owner) else self.names.owner_datasets("-")
        return self._newest_first(
            index, decode_dataset, self.names.dataset,
            keep=lambda record: record.owner == owner and (status is None or record.status == status),
            cursor=cursor, limit=limit,
        )

    def move_dataset(self, dataset_id: str, to_status: str, *, allowed_from: Iterable[str]) -> bool:
        """Move the dataset to ``to_status`` if its status is one of ``allowed_from`` (atomic);
        False, changing nothing, otherwise (or when there is no such dataset)."""
        return self._move(dataset_id, to_status, allowed_from, {})

    def set_dataset_ready(self, dataset_id: str, info: DatasetInfo) -> bool:
        """``validating -> ready`` with what validation found; False if it was not validating."""
        return self._move(dataset_id, READY, {VALIDATING}, {"info": info.model_dump(mode="json"), "error": None})

    def set_dataset_invalid(self, dataset_id: str, reason: str) -> bool:
        """``uploading | validating -> invalid`` with the reason; False otherwise."""
        return self._move(dataset_id, INVALID, {UPLOADING, VALIDATING}, {"error": reason, "info": None})

    def _move(self, dataset_id: str, to_status: str, allowed_from: Iterable[str], fields: dict[str, object]) -> bool:
        allowed = set(allowed_from)
        if to_status not in DATASET_STATUSES or not allowed <= set(DATASET_STATUSES):
            raise ValueError(f"unknown dataset status in {to_status!r} / {sorted(allowed)}")
        if not is_dataset_id(dataset_id) or not allowed:
            return False
        pairs: list[str] = []
        for name, value in fields.items():
            pairs += [name, dumps(value)]
        done = self._script(_MOVE)(
            keys=[self.names.dataset(dataset_id)],
            args=[dumps(to_status), dumps(utc_now()), ",".join(sorted(allowed)), *pairs],
        )
        if done:
            log.info("dataset %s -> %s", dataset_id, to_status)
        return bool(done)

    def active_jobs_using(self, owner: str, dataset_id: str) -> list[str]:
        """Ids of ``owner``'s queued, running and cancelling jobs whose spec names ``dataset_id``."""
        if not OWNER.match(owner):
            return []
        active = sorted(cast(set[str], self.redis.smembers(self.names.owner_active(owner))))
        pipe = self.redis.pipeline(transaction=False)
        for job_id in active:
            pipe.hgetall(self.names.job(job_id))
        jobs = [decode_record(raw) for raw in pipe.execute()] if active else []
        return [job.id for job in jobs if job is not None and _spec_dataset_id(job.spec) == dataset_id]

    def delete_dataset(self, dataset_id: str) -> bool:
        """Remove the record (the caller frees the stored bytes); False if there was none. Raises
        :class:`DatasetInUse`, deleting nothing, while an active job of the owner names it."""
        record = self.get_dataset(dataset_id)
        if record is None:
            return False
        result = self._script(_DELETE)(
            keys=[self.names.dataset(dataset_id), self.names.owner_datasets(record.owner),
                  self.names.owner_active(record.owner)],
            args=[self.prefix, dataset_id],
        )
        code, *job_ids = result
        if int(code) == 2:
            raise DatasetInUse(dataset_id, [str(j) for j in job_ids])
        if int(code) == 1:
            log.info("dataset %s deleted", dataset_id)
        return int(code) == 1
