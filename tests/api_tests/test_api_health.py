"""api/routes/health.py: liveness and readiness."""

from __future__ import annotations

import pytest
from api_support import Api

pytestmark = pytest.mark.anyio


async def test_health(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    assert (await api.client.get("/readyz")).json() == {"status": "ready"}
