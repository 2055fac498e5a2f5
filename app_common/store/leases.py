"""Job leases (which worker runs a job), their heartbeat, staleness, and the reaper's claims; and
the leased slots that cap an API key's open event streams across every API process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from redis.exceptions import ResponseError

from app_common.events import CANCELLING, RUNNING
from app_common.jobs import JobRecord
from app_common.store._common import OWNER, StoreBase, dumps, is_job_id, utc_now

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_HEARTBEAT = """
-- KEYS: lease, job; ARGV: token, ttl ms, now (JSON)
-- Renew the lease, or take it again if it expired and nobody else took it (a pause or a Redis
-- outage longer than the TTL); then stamp the record's heartbeat_at. A deleted job: nothing to
-- hold (the run notices the deletion at its next event).
if redis.call('EXISTS', KEYS[2]) == 0 then return 1 end
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  return 0
end
redis.call('HSET', KEYS[2], 'heartbeat_at', ARGV[3])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# The time of the Redis server in ms: one clock for every API host's leases.
_REDIS_NOW_MS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
-- The zset lives as long as its longest lease (never shortened by a shorter one), then goes.
local function extend_to(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"""

_STREAM_ACQUIRE = _REDIS_NOW_MS + """
-- KEYS: the owner's open streams (zset: slot id -> lease end ms); ARGV: slot id, cap, lease ms
-- Leases that ended (their API process died without giving them back) are dropped first.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
extend_to(KEYS[1], tonumber(ARGV[3]))
return 1
"""

_STREAM_RENEW = _REDIS_NOW_MS + """
-- KEYS: the owner's open streams, the API keys hash; ARGV: slot id, lease ms, sha256 of the key's
-- secret ('' = none to check). A revoked key's slot is given back (-1). A lease that ended while
-- its stream lived on (a stalled process) is taken again: the stream is still open.
if ARGV[3] ~= '' and redis.call('HEXISTS', KEYS[2], ARGV[3]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return -1
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
extend_to(KEYS[1], tonumber(ARGV[2]))
return 1
"""

# A job in these statuses must have a worker renewing its lease; without one it is stale.
_LEASED_STATUSES = frozenset({RUNNING, CANCELLING})


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


# Jobs per pipeline of the batched reads and claims: one round trip each, bounded replies.
BATCH = 500


def _chunks(items: Sequence[str]) -> list[Sequence[str]]:
    return [items[i : i + BATCH] for i in range(0, len(items), BATCH)]


class LeaseOps(StoreBase):
    def acquire_lease(self, job_id: str, token: str, ttl_s: float) -> bool:
        """Take the job's lease unless another live token holds it."""
        return bool(self.redis.set(self.names.lease(job_id), token, nx=True, px=_ms(ttl_s)))

    def renew_lease(self, job_id: str, token: str, ttl_s: float) -> bool:
        """Extend the lease if ``token`` still holds it; False means it was lost."""
        return bool(self._script(_RENEW)(keys=[self.names.lease(job_id)], args=[token, _ms(ttl_s)]))

    def heartbeat(self, job_id: str, token: str, ttl_s: float) -> bool:
        """One beat of the holder of ``token``: renew its lease, or re-take it when it expired and
        is free; on success also set the record's ``heartbeat_at``. False: another token holds the
        lease (another worker took the job over). A deleted job is left alone (True: the run
        finds it deleted at its next event). Atomic."""
        if not is_job_id(job_id):
            return False
        return bool(
            self._script(_HEARTBEAT)(
                keys=[self.names.lease(job_id), self.names.job(job_id)], args=[token, _ms(ttl_s), dumps(utc_now())]
            )
        )

    def release_lease(self, job_id: str, token: str) -> None:
        self._script(_RELEASE)(keys=[self.names.lease(job_id)], args=[token])

    def lease_alive(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.names.lease(job_id)))

    def with_staleness(self, records: Sequence[JobRecord]) -> list[JobRecord]:
        """``records`` with ``stale`` set: True for a running or cancelling job whose lease is gone
        (its worker died, or lost Redis for longer than the TTL, and nobody has resumed it yet).
        One round trip for all the running ones; none when there are none."""
        leased = [r for r in records if r.status in _LEASED_STATUSES]
        if not leased:
            return list(records)
        pipe = self.redis.pipeline(transaction=False)
        for record in leased:
            pipe.exists(self.names.lease(record.id))
        alive = dict(zip((r.id for r in leased), cast(list[int], pipe.execute()), strict=True))
        return [r.model_copy(update={"stale": not alive[r.id]}) if r.id in alive else r for r in records]

    def claim_reap(self, job_id: str, window_s: float) -> bool:
        """True for the first reaper to claim re-enqueueing ``job_id`` within ``window_s``; every
        other claim in the window (another reaper, or this one's next pass) gets False."""
        return bool(self.redis.set(self.names.reaped(job_id), "1", nx=True, px=_ms(window_s)))

    def leases_alive(self, job_ids: Sequence[str]) -> dict[str, bool]:
        """:meth:`lease_alive` of each of ``job_ids``, in one round trip per :data:`BATCH` jobs."""
        alive: dict[str, bool] = {}
        for chunk in _chunks(job_ids):
            pipe = self.redis.pipeline(transaction=False)
            for job_id in chunk:
                pipe.exists(self.names.lease(job_id))
            alive.update(zip(chunk, (bool(n) for n in pipe.execute()), strict=True))
        return alive

    def claim_reaps(self, job_ids: Sequence[str], window_s: float) -> set[str]:
        """:meth:`claim_reap` of each of ``job_ids`` (in order), in one round trip per
        :data:`BATCH` jobs; returns the ids this call claimed."""
        claimed: set[str] = set()
        for chunk in _chunks(job_ids):
            pipe = self.redis.pipeline(transaction=False)
            for job_id in chunk:
                pipe.set(self.names.reaped(job_id), "1", nx=True, px=_ms(window_s))
            claimed.update(job_id for job_id, won in zip(chunk, pipe.execute(), strict=True) if won)
        return claimed

    def release_reaps(self, job_ids: Sequence[str]) -> None:
        """Give back claims of :meth:`claim_reaps` whose jobs were not sent after all (the broker
        failed part-way through a pass): the next pass may claim them again."""
        for chunk in _chunks(job_ids):
            self.redis.delete(*(self.names.reaped(job_id) for job_id in chunk))

    # --- event stream slots (the API's per-key cap on open streams) ------------------------------
    # Each open stream holds a slot: a member of the key's zset scored by the end of its lease on
    # Redis's clock. Streams renew their lease while they run and give it back when they end; the
    # slots of an API process that died without giving them back are dropped once their lease ends.

    def acquire_stream_slot(self, owner: str, slot_id: str, per_key: int, lease_s: float) -> bool:
        """Take slot ``slot_id`` for a new stream of ``owner`` unless it holds ``per_key`` live
        ones already (every API process counted: they share this key). Atomic."""
        if not OWNER.match(owner):
            raise ValueError(f"invalid owner {owner!r}")
        return bool(self._script(_STREAM_ACQUIRE)(
            keys=[self.names.stream_slots(owner)], args=[slot_id, per_key, _ms(lease_s)]
        ))

    def renew_stream_slot(self, owner: str, slot_id: str, lease_s: float, key_digest: str | None = None) -> bool:
        """Extend the slot's lease (or take it again if it ended while its stream lived on); False,
        with the slot given back, when ``key_digest`` (sha256 of the key's secret, see
        ``hash_secret``) is no longer an API key: the key was revoked and its stream should end."""
        return int(self._script(_STREAM_RENEW)(
            keys=[self.names.stream_slots(owner), self.names.api_keys],
            args=[slot_id, _ms(lease_s), key_digest or ""],
        )) > 0

    def release_stream_slot(self, owner: str, slot_id: str) -> None:
        self.redis.zrem(self.names.stream_slots(owner), slot_id)

    def open_streams(self, owner: str) -> int:
        """The slots ``owner`` holds whose lease has not ended."""
        seconds, micros = self.redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        return int(self.redis.zcount(self.names.stream_slots(owner), f"({now_ms}", "+inf"))

    def redis_uptime_s(self) -> float | None:
        """Seconds since the Redis server started (INFO server); None where INFO is not allowed.
        The reaper waits after a restart: leases that expired while Redis was down are not yet
        renewed by their live workers."""
        try:
            info = cast(dict[str, object], self.redis.info("server"))
        except ResponseError:  # a managed Redis may refuse INFO: then only the reaper's own view counts
            return None
        uptime = info.get("uptime_in_seconds")
        return float(uptime) if isinstance(uptime, int | float | str) else None

