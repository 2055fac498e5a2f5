"""Fixtures of the worker tests: settings with a short lease, isolated under the test's prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from app_common.settings import Settings


@pytest.fixture
def settings(redis_url: str, key_prefix: str, tmp_path: Path) -> Settings:
    (tmp_path / "data").mkdir()
    # A 2 s lease: takeovers and the reaper act within seconds instead of half a minute.
    return Settings(
        redis_url=redis_url,
        redis_prefix=key_prefix,
        artifacts_dir=tmp_path / "artifacts",
        storage_dir=tmp_path / "storage",
        data_dir=tmp_path / "data",
        job_lease_ttl_s=2,
        # Celery's queues under the test's prefix too: isolated, and removed with its keys.
        celery_key_prefix=f"{key_prefix}:celery:",
    )
