"""Idempotency-Key records of the API: the first answer to a POST, replayed to its retries."""

from __future__ import annotations

import json
from typing import Any

from app_common.store._common import IDEM_KEY, StoreBase, dumps


class IdempotencyOps(StoreBase):
    def reserve_idempotency(self, owner: str, key: str, fingerprint: str, ttl_s: int) -> dict[str, Any] | None:
        """Claim ``key`` for a request whose body hashes to ``fingerprint``.

        Returns None when this call claimed it (go ahead, then :meth:`complete_idempotency` or
        :meth:`release_idempotency`), else the existing record ``{fingerprint, response}``
        (``response`` is None while the first request is still being handled).
        """
        if not IDEM_KEY.match(key):
            raise ValueError("invalid idempotency key")
        record = {"fingerprint": fingerprint, "response": None}
        name = self.names.idempotency(owner, key)
        if self.redis.set(name, dumps(record), nx=True, ex=ttl_s):
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
        self.redis.set(self.names.idempotency(owner, key), dumps(record), ex=ttl_s)

    def release_idempotency(self, owner: str, key: str) -> None:
        """Forget a claim whose request failed, so the client may retry with the same key."""
        self.redis.delete(self.names.idempotency(owner, key))
