"""The per-key submission rate limit (``APP_SUBMIT_RATE_LIMIT``, e.g. ``30/minute``).

Counted by the ``limits`` library in Redis (a moving window), so every API process shares one
count per key and a restart forgets nothing. The counters live under the store's
``ratelimit`` prefix (:attr:`app_common.store.KeyNames.rate_limits`).
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from api.errors import ApiProblem
from app_common.settings import Settings


class SubmitRateLimit:
    """``check(owner)`` counts one submission of ``owner`` and raises a 429 problem when the
    window is full; other keys have their own window."""

    def __init__(self, item: RateLimitItem, storage: RedisStorage, spelled: str) -> None:
        self.item = item
        self.spelled = spelled
        self.limiter = MovingWindowRateLimiter(storage)

    @classmethod
    def from_settings(cls, settings: Settings, key_prefix: str) -> SubmitRateLimit | None:
        """The limit the settings name, None when ``submit_rate_limit`` is empty (no limit)."""
        spelled = (settings.submit_rate_limit or "").strip()
        if not spelled or not settings.redis_url:
            return None
        timeout = settings.redis_timeout_s
        # Fail fast like the store's client: an unreachable Redis is a 503 within ~timeout.
        storage = RedisStorage(
            settings.redis_url, key_prefix=key_prefix, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        return cls(parse(spelled), storage, spelled)

    def check(self, owner: str) -> None:
        if self.limiter.hit(self.item, owner):
            return
        reset_at = self.limiter.get_window_stats(self.item, owner).reset_time
        retry_after = max(1, math.ceil(reset_at - time.time()))
        raise ApiProblem(
            429,
            f"at most {self.spelled} job submissions per API key; try again in {retry_after} s",
            slug="submit-rate-limited",
            headers={"Retry-After": str(retry_after)},
        )
