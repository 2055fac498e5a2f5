"""Fixtures of the API tests: the settings of a test app and the app with its client (see api_support)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from api_support import Api, make_api

from app_common.settings import Settings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings(redis_url: str, key_prefix: str, tmp_path: Path) -> Settings:
    data = tmp_path / "data"
    (data / "cifar").mkdir(parents=True)
    (data / "cifar" / "train.npz").write_bytes(b"not read by the API")
    return Settings(
        redis_url=redis_url,
        redis_prefix=key_prefix,
        celery_key_prefix=f"{key_prefix}:celery:",
        data_dir=data,
        artifacts_dir=tmp_path / "artifacts",
        storage_dir=tmp_path / "storage",
        signing_secret="test-signing-secret",
        max_epochs=20,
        max_megabatches=10,
        max_concurrent_jobs_per_key=3,
        max_body_bytes=4096,
        sse_heartbeat_s=0.2,
        # Tests' webhook receivers listen on 127.0.0.1 (test_api_webhooks.py checks the refusal).
        webhook_allow_private=True,
    )


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async for value in make_api(settings):
        yield value
