"""Signed, expiring artifact links, like an object store's presigned URLs: anyone holding the link
can download that one file until it expires, without an API key.

``sig = hex(HMAC-SHA256(secret, f"{job_id}/{name}/{expires}"))`` with ``expires`` in Unix seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlencode


def sign(secret: str, job_id: str, name: str, expires: int) -> str:
    message = f"{job_id}/{name}/{expires}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(secret: str, job_id: str, name: str, expires: int, sig: str, *, now: float | None = None) -> str | None:
    """None when the link is valid, else why not ("expired", "bad signature")."""
    expected = sign(secret, job_id, name, expires)
    # Constant-time comparison: timing must not reveal how much of a forged signature matched.
    if not hmac.compare_digest(expected, sig.lower() if sig.isascii() else ""):
        return "bad signature"
    if expires < (time.time() if now is None else now):
        return "expired"
    return None


def signed_query(secret: str, job_id: str, name: str, ttl_s: int, *, now: float | None = None) -> tuple[str, int]:
    """(query string, expires) of a download link for ``name`` valid for ``ttl_s`` seconds; the
    route that serves the file builds the path."""
    expires = int(time.time() if now is None else now) + ttl_s
    return urlencode({"expires": expires, "sig": sign(secret, job_id, name, expires)}), expires
