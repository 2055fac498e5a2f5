"""Webhooks in Redis: each API key's signing secret, the outbox of pending deliveries, couriers'
claims on them and each job's bounded history of attempts.

A delivery is queued by the same Lua script that writes the change it reports (a status move in
:mod:`~app_common.store.records`, a ``megabatch_ended`` in :mod:`~app_common.store.events`, both
through :data:`ENQUEUE_WEBHOOK_LUA`), so no process can die between the change and its delivery.
The script keeps a copy of the job's record as it is right after the change: the delivery's
``data`` is the job at that event, whenever the courier sends it.

Couriers (:mod:`worker.courier`) take due deliveries with :meth:`WebhookOps.claim_deliveries`:
a claim moves the delivery from the ``due`` set to the ``claimed`` set with an expiry, so two
couriers never send the same attempt at once, and a dead courier's claims go back to ``due``
when they expire (at-least-once). :meth:`WebhookOps.finish_attempt` records the attempt and
either drops the delivery (delivered, or given up) or puts it back with its next attempt time;
it does nothing for a claim that expired meanwhile (a courier took it again).

Every delivery has a deadline: the time it was queued (kept in the ``queued`` set) plus the retry
window (:func:`app_common.webhooks.delivery_window_s`, from the settings of the process that
looks). :meth:`WebhookOps.expire_deliveries` gives up, a bounded number per call, the deliveries
past it that no live claim holds, and writes why in the job's history. Every worker's reaper calls
it, so the outbox stays bounded even where no courier runs (a control worker without the
``webhooks`` extra, or none at all); the courier calls it before claiming.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from app_common.store._common import StoreBase, dumps, format_time, is_job_id
from app_common.webhooks import EVENT_TYPES, new_secret

# Attempts kept per job in its delivery history (newest first in Redis).
HISTORY_MAX = 200
# Deliveries one expire_deliveries call gives up at most; the rest wait for the next call.
EXPIRE_BATCH = 200

# A Lua function for the scripts that change a job: queue a delivery of ``event`` when the job's
# ``notify`` asks for it. ``msg_id`` is the new delivery's webhook-id (made by the caller; unused
# when nothing is queued), ``extra`` the JSON of the ``megabatch`` part ('' for none).
ENQUEUE_WEBHOOK_LUA = """
local function enqueue_webhook(prefix, job_id, event, msg_id, now_ms, now_iso, extra)
  if msg_id == '' then return end
  local job_key = prefix .. ':job:' .. job_id
  local raw = redis.call('HGET', job_key, 'notify')
  if (not raw) or raw == 'null' then return end
  local notify = cjson.decode(raw)
  local wanted = false
  for _, e in ipairs(notify['events'] or {}) do
    if e == event then wanted = true end
  end
  if not wanted then return end
  redis.call('HSET', prefix .. ':webhook:msg:' .. msg_id, 'job_id', job_id, 'event', event,
             'url', notify['url'], 'timestamp', now_iso, 'megabatch', extra, 'attempt', '0',
             'queued', now_ms, 'record', cjson.encode(redis.call('HGETALL', job_key)))
  redis.call('ZADD', prefix .. ':webhook:due', now_ms, msg_id)
  redis.call('ZADD', prefix .. ':webhook:queued', now_ms, msg_id)
end
"""

_CLAIM = """
-- KEYS: due, claimed; ARGV: prefix, now ms, lease ms, limit, token
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
for _, m in ipairs(expired) do
  redis.call('ZREM', KEYS[2], m)
  redis.call('ZADD', KEYS[1], ARGV[2], m)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[1], m)
  local key = ARGV[1] .. ':webhook:msg:' .. m
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'claim', ARGV[5])
    redis.call('ZADD', KEYS[2], tonumber(ARGV[2]) + tonumber(ARGV[3]), m)
    out[#out + 1] = m
  else
    redis.call('ZREM', ARGV[1] .. ':webhook:queued', m)
  end
end
return out
"""

_FINISH = """
-- KEYS: delivery, due, claimed, job's history, job
-- ARGV: msg id, claim token, attempt JSON, attempt number, next attempt ms ('' = over), body, history max,
--       the queued set
if redis.call('HGET', KEYS[1], 'claim') ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('LPUSH', KEYS[4], ARGV[3])
  redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[7]) - 1)
end
if ARGV[5] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', ARGV[8], ARGV[1])
else
  redis.call('HSET', KEYS[1], 'attempt', ARGV[4], 'claim', '', 'body', ARGV[6])
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
end
return 1
"""

_EXPIRE = """
-- KEYS: due, claimed, queued; ARGV: prefix, now ms, history max, then per delivery:
-- msg id, job id, its attempt count as read (the entry is stale if it changed), history entry JSON
local out = {}
for i = 4, #ARGV, 4 do
  local m, job_id = ARGV[i], ARGV[i + 1]
  local key = ARGV[1] .. ':webhook:msg:' .. m
  local held = redis.call('ZSCORE', KEYS[2], m)
  local live = held and tonumber(held) > tonumber(ARGV[2])
  local attempt = redis.call('HGET', key, 'attempt')
  if not live and ((not attempt) or attempt == ARGV[i + 2]) then
    redis.call('ZREM', KEYS[1], m)
    redis.call('ZREM', KEYS[2], m)
    redis.call('ZREM', KEYS[3], m)
    if attempt then
      redis.call('DEL', key)
      local job_key = ARGV[1] .. ':job:' .. job_id
      if job_id ~= '' and redis.call('EXISTS', job_key) == 1 then
        redis.call('LPUSH', job_key .. ':deliveries', ARGV[i + 3])
        redis.call('LTRIM', job_key .. ':deliveries', 0, tonumber(ARGV[3]) - 1)
      end
      out[#out + 1] = m
    end
  end
end
return out
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def _span(seconds: float) -> str:
    return f"{seconds:g} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _at(ms: int) -> str:
    return format_time(datetime.fromtimestamp(ms / 1000, UTC))


def expired_entry(msg_id: str, raw: dict[str, str], *, window_s: float, now: int) -> dict[str, Any]:
    """The history entry that gives up delivery ``msg_id`` (its hash ``raw``) at its deadline."""
    attempts = int(raw.get("attempt") or 0)
    queued = int(raw.get("queued") or 0)
    since = f"queued at {_at(queued)}, " if queued else ""
    if attempts:
        what = f"{attempts} attempt{'s' if attempts > 1 else ''} made, none delivered"
    else:
        what = "never attempted: no courier took it (is a control worker with the `webhooks` extra running?)"
    entry: dict[str, Any] = {
        "time": _at(now),
        "event": EVENT_TYPES.get(raw.get("event", ""), raw.get("event", "")),
        "webhook_id": msg_id,
        "attempt": attempts,
        "status_code": None,
        "error": f"expired: not delivered within its retry window of {_span(window_s)} ({since}"
                 f"deadline {_at(queued + int(window_s * 1000)) if queued else 'passed'}); {what}",
        "outcome": "failed",
        "next_attempt_at": None,
    }
    if raw.get("megabatch"):
        with contextlib.suppress(ValueError):  # unreadable: the entry goes without its index
            megabatch = json.loads(raw["megabatch"])
            entry["megabatch"] = megabatch.get("index") if isinstance(megabatch, dict) else None
    return entry


@dataclass(frozen=True)
class PendingDelivery:
    """A queued delivery as a courier reads it."""

    msg_id: str
    job_id: str
    event: str  # started | megabatch | completed
    url: str
    timestamp: str  # ISO time of the event
    record_fields: dict[str, str]  # the job's hash right after the event (decode_record reads it)
    megabatch: dict[str, Any] | None
    body: str | None  # set after the first attempt: every retry sends the same bytes
    attempts: int  # attempts made so far
    claim: str
    queued_ms: int | None  # when it was queued (its deadline is this plus the retry window)


class WebhookOps(StoreBase):
    # --- signing secrets, one per API key (owner) -----------------------------------------------
    def webhook_secret(self, owner: str) -> str:
        """The owner's signing secret, created on first use."""
        self.redis.hsetnx(self.names.webhook_secrets, owner, new_secret())
        return str(self.redis.hget(self.names.webhook_secrets, owner))

    def rotate_webhook_secret(self, owner: str) -> str:
        """Replace the owner's signing secret; returns the new one (deliveries from now on use it)."""
        secret = new_secret()
        self.redis.hset(self.names.webhook_secrets, owner, secret)
        return secret

    def delete_webhook_secret(self, owner: str) -> None:
        self.redis.hdel(self.names.webhook_secrets, owner)

    # --- the outbox -----------------------------------------------------------------------------
    def claim_deliveries(self, limit: int, lease_s: float) -> tuple[str, list[str]]:
        """Claim up to ``limit`` due deliveries for ``lease_s``; returns (claim token, their ids).
        Claims older than their lease go back to the due set first."""
        token = uuid.uuid4().hex
        if limit < 1:
            return token, []
        ids = self._script(_CLAIM)(
            keys=[self.names.webhook_due, self.names.webhook_claimed],
            args=[self.prefix, now_ms(), int(lease_s * 1000), limit, token],
        )
        return token, [str(i) for i in ids]

    def get_delivery(self, msg_id: str) -> PendingDelivery | None:
        raw = cast(dict[str, str], self.redis.hgetall(self.names.webhook_message(msg_id)))
        if not raw or "job_id" not in raw:
            return None
        # cjson writes the job hash as a flat list: field, value, field, value, ...
        flat = json.loads(raw.get("record") or "[]")
        fields = {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)} if isinstance(flat, list) else {}
        return PendingDelivery(
            msg_id=msg_id, job_id=raw["job_id"], event=raw.get("event", ""), url=raw.get("url", ""),
            timestamp=raw.get("timestamp", ""), record_fields=fields,
            megabatch=json.loads(raw["megabatch"]) if raw.get("megabatch") else None,
            body=raw.get("body") or None, attempts=int(raw.get("attempt") or 0), claim=raw.get("claim", ""),
            queued_ms=int(raw["queued"]) if raw.get("queued") else None,
        )

    def finish_attempt(
        self, delivery: PendingDelivery, token: str, attempt: dict[str, Any], *, body: str, next_at_ms: int | None
    ) -> bool:
        """Record one attempt (``attempt`` is its history entry); with ``next_at_ms`` the delivery
        goes back to the due set for then, without it the delivery is over (delivered or given up).
        False when the claim ``token`` is no longer the delivery's (it expired; someone else has it)."""
        done = self._script(_FINISH)(
            keys=[self.names.webhook_message(delivery.msg_id), self.names.webhook_due, self.names.webhook_claimed,
                  self.names.deliveries(delivery.job_id), self.names.job(delivery.job_id)],
            args=[delivery.msg_id, token, dumps(attempt), attempt["attempt"],
                  "" if next_at_ms is None else next_at_ms, body, HISTORY_MAX, self.names.webhook_queued],
        )
        return bool(done)

    def expire_deliveries(self, window_s: float, *, limit: int = EXPIRE_BATCH) -> list[str]:
        """Give up the deliveries queued more than ``window_s`` ago (their deadline passed), at most
        ``limit`` of them, oldest first; returns their ids. Each gets a last history entry with
        outcome ``failed`` and an ``expired: ...`` error saying why. A delivery a courier holds right
        now (a live claim) is left to that courier; it expires on a later call if still pending."""
        now = now_ms()
        cutoff = f"({now - int(window_s * 1000)}"
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrangebyscore(self.names.webhook_queued, "-inf", cutoff, start=0, num=limit)
        # Deliveries queued before deadlines were kept are in no queued set; one due (or held)
        # since before the cutoff was queued before it too.
        pipe.zrangebyscore(self.names.webhook_due, "-inf", cutoff, start=0, num=limit)
        pipe.zrangebyscore(self.names.webhook_claimed, "-inf", cutoff, start=0, num=limit)
        ids = list(dict.fromkeys(str(m) for group in pipe.execute() for m in group))[:limit]
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for msg_id in ids:
            pipe.hgetall(self.names.webhook_message(msg_id))
        args: list[Any] = [self.prefix, now, HISTORY_MAX]
        for msg_id, raw in zip(ids, cast(list[dict[str, str]], pipe.execute()), strict=True):
            entry = expired_entry(msg_id, raw, window_s=window_s, now=now) if raw else {}
            args += [msg_id, raw.get("job_id", ""), raw.get("attempt", ""), dumps(entry)]
        expired = self._script(_EXPIRE)(
            keys=[self.names.webhook_due, self.names.webhook_claimed, self.names.webhook_queued], args=args)
        return [str(m) for m in expired]

    def pending_deliveries(self) -> int:
        """Deliveries queued or being attempted."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(self.names.webhook_due)
        pipe.zcard(self.names.webhook_claimed)
        return sum(int(n) for n in pipe.execute())

    def delivery_attempts(self, job_id: str) -> list[dict[str, Any]]:
        """The job's delivery attempts, oldest first (the newest :data:`HISTORY_MAX`)."""
        if not is_job_id(job_id):
            return []
        rows = cast(list[str], self.redis.lrange(self.names.deliveries(job_id), 0, -1))
        return [json.loads(row) for row in reversed(rows)]
