"""Fair dispatch: one FIFO of queued job ids per API key and training queue, served least recently
served key first.

One Celery queue is first come, first served: a key that queued (or queued and cancelled) many
jobs delays every other key's job. Instead the API pushes a new job's id onto its owner's list
here, and a training worker with a free slot pops the next job with :meth:`QueueOps.pop_next_job`:
among the keys with queued work, the key whose last dispatch is the oldest (a key never served
comes first) gives its oldest queued job. So with keys A (a backlog) and B (one job), B's job is
the next to start, whatever A queued before it; keys with work take turns.

Cancelled and deleted jobs cost nothing: cancel and delete take the id off its list
(:meth:`QueueOps.unqueue_job`), and a pop skips any id whose job is no longer ``queued``.
A popped job is remembered in ``dispatch:sent`` until it starts, so the reaper can hand it out
again when the worker it went to died before starting it.
"""

from __future__ import annotations

import time
from typing import cast

from app_common.events import QUEUED
from app_common.store._common import StoreBase, dumps, is_job_id

_PUSH = """
-- KEYS: owner list, ready zset, served hash; ARGV: job id, owner
redis.call('RPUSH', KEYS[1], ARGV[1])
if not redis.call('ZSCORE', KEYS[2], ARGV[2]) then
  redis.call('ZADD', KEYS[2], tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0'), ARGV[2])
end
return 1
"""

_UNQUEUE = """
-- KEYS: owner list, ready zset; ARGV: job id, owner
local removed = redis.call('LREM', KEYS[1], 0, ARGV[1])
if redis.call('LLEN', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[2]) end
return removed
"""

_POP = """
-- KEYS: ready zset, served hash, turn counter, sent zset
-- ARGV: owner list key prefix, job hash key prefix, now ms, queued status (JSON)
-- Invariant: an owner is in the ready zset exactly when its list is not empty.
while true do
  local top = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #top == 0 then return false end
  local owner = top[1]
  local list = ARGV[1] .. owner
  local job = false
  while not job do
    local id = redis.call('LPOP', list)
    if not id then break end
    -- Skip ids whose job was cancelled, deleted or already handed out (a stale entry).
    if redis.call('HGET', ARGV[2] .. id, 'status') == ARGV[4] then job = id end
  end
  if job then
    local turn = redis.call('INCR', KEYS[3])
    redis.call('HSET', KEYS[2], owner, turn)
    if redis.call('LLEN', list) > 0 then
      redis.call('ZADD', KEYS[1], turn, owner)
    else
      redis.call('ZREM', KEYS[1], owner)
    end
    redis.call('ZADD', KEYS[4], ARGV[3], job)
    return job
  end
  redis.call('ZREM', KEYS[1], owner)
end
"""


class QueueOps(StoreBase):
    def enqueue_job(self, queue: str, owner: str, job_id: str) -> None:
        """Queue ``job_id`` (already created, status ``queued``) at the end of ``owner``'s list on ``queue``."""
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        names = self.names
        self._script(_PUSH)(
            keys=[names.dispatch_owner(queue, owner), names.dispatch_ready(queue), names.dispatch_served(queue)],
            args=[job_id, owner],
        )

    def unqueue_job(self, queue: str, owner: str, job_id: str) -> bool:
        """Take ``job_id`` off ``owner``'s list (a cancelled or deleted job); True if it was there."""
        names = self.names
        removed = self._script(_UNQUEUE)(
            keys=[names.dispatch_owner(queue, owner), names.dispatch_ready(queue)], args=[job_id, owner]
        )
        return bool(removed)

    def pop_next_job(self, queue: str) -> str | None:
        """The next job to run on ``queue``: the oldest queued job of the key served least recently
        (atomic, so two workers never pop the same job); None when nothing is queued. The job is
        recorded as sent (:meth:`sent_jobs`) until :meth:`forget_sent`."""
        names = self.names
        job_id = self._script(_POP)(
            keys=[names.dispatch_ready(queue), names.dispatch_served(queue), names.dispatch_turn(queue),
                  names.dispatch_sent],
            args=[names.dispatch_owner(queue, ""), names.job(""), int(time.time() * 1000), dumps(QUEUED)],
        )
        return cast(str, job_id) if job_id else None

    def queued_job_ids(self, queue: str, owner: str) -> list[str]:
        """``owner``'s list on ``queue``, oldest first (may hold ids of jobs cancelled meanwhile)."""
        return cast(list[str], self.redis.lrange(self.names.dispatch_owner(queue, owner), 0, -1))

    def queued_count(self, queue: str) -> int:
        """Ids waiting on ``queue`` over all keys (stale ids of cancelled jobs included)."""
        owners = cast(list[str], self.redis.zrange(self.names.dispatch_ready(queue), 0, -1))
        if not owners:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for owner in owners:
            pipe.llen(self.names.dispatch_owner(queue, owner))
        return sum(int(n) for n in pipe.execute())

    def sent_jobs(self, older_than_s: float = 0.0) -> list[str]:
        """Jobs popped for a worker at least ``older_than_s`` ago and not yet forgotten."""
        cutoff = int((time.time() - older_than_s) * 1000)
        return cast(list[str], self.redis.zrangebyscore(self.names.dispatch_sent, "-inf", cutoff))

    def forget_sent(self, job_id: str) -> None:
        """The job started (or ended, or was handed out again): stop watching its dispatch."""
        self.redis.zrem(self.names.dispatch_sent, job_id)
