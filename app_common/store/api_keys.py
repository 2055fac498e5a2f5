"""API keys: only sha256(secret) is stored; the key id is the owner of the jobs made with it."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from typing import Any

from app_common.store._common import StoreBase, dumps, utc_now

log = logging.getLogger(__name__)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKeyOps(StoreBase):
    def create_key(self, name: str) -> tuple[str, str]:
        """A new API key; returns (key_id, secret). Only sha256(secret) is stored, so the secret
        is shown once. The key id is the owner of the jobs created with it."""
        key_id = f"key_{secrets.token_hex(8)}"
        secret = f"ap_{secrets.token_urlsafe(32)}"
        record = {"key_id": key_id, "name": name, "created_at": utc_now()}
        self.redis.hset(self.names.api_keys, hash_secret(secret), dumps(record))
        log.info("API key %s (%s) created", key_id, name)
        return key_id, secret

    def owner_for_secret(self, secret: str) -> str | None:
        raw = self.redis.hget(self.names.api_keys, hash_secret(secret))
        return str(json.loads(raw)["key_id"]) if raw else None

    def revoke_key(self, key_id: str) -> bool:
        for digest, raw in self.redis.hgetall(self.names.api_keys).items():
            if json.loads(raw)["key_id"] == key_id:
                self.redis.hdel(self.names.webhook_secrets, key_id)  # its webhook signing secret
                return bool(self.redis.hdel(self.names.api_keys, digest))
        return False

    def list_keys(self) -> list[dict[str, Any]]:
        """Key records ``{key_id, name, created_at}``, oldest first; never the secret."""
        records = [json.loads(raw) for raw in self.redis.hgetall(self.names.api_keys).values()]
        return sorted(records, key=lambda r: (r["created_at"], r["key_id"]))
