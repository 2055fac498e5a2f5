"""Settings: environment parsing, defaults and the queue rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app_common.settings import Settings

ENV_NAMES = ("REDIS_URL", "APP_REDIS_URL", "APP_QUEUES", "APP_DEFAULT_QUEUE", "APP_MAX_EPOCHS", "APP_DATA_DIR")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_defaults() -> None:
    s = Settings()
    assert s.redis_url is None and s.redis_prefix == "app" and s.auth_enabled is True
    assert (s.max_epochs, s.max_megabatches, s.max_concurrent_jobs_per_key) == (200, 100, 8)
    assert (s.max_body_bytes, s.download_url_ttl_s, s.job_lease_ttl_s, s.max_attempts) == (65536, 3600, 30, 3)
    assert (s.events_maxlen, s.redis_timeout_s) == (10000, 1.0)
    assert s.artifacts_dir == Path("runs/artifacts") and s.data_dir == Path("data")
    assert s.queues == ("cpu",) and s.default_queue == "cpu"
    assert s.celery_transport_options() == {"visibility_timeout": 86400}


def test_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("APP_QUEUES", "cpu, gpu")
    monkeypatch.setenv("APP_MAX_EPOCHS", "7")
    monkeypatch.setenv("APP_DATA_DIR", str(tmp_path))
    s = Settings()
    assert s.redis_url == "redis://example:6380/2"
    assert s.queues == ("cpu", "gpu") and s.max_epochs == 7 and s.data_dir == tmp_path


def test_queue_for_device() -> None:
    cpu_only = Settings()
    assert [cpu_only.queue_for_device(d) for d in ("auto", "cpu", "cuda")] == ["cpu", "cpu", None]
    both = Settings(queues="cpu,gpu", default_queue="gpu")
    assert [both.queue_for_device(d) for d in ("auto", "cpu", "cuda")] == ["gpu", "cpu", "gpu"]


@pytest.mark.parametrize(
    "kwargs",
    [{"queues": "tpu"}, {"queues": ""}, {"default_queue": "gpu"}, {"max_epochs": 0}, {"redis_prefix": "a b"}],
)
def test_invalid(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(**kwargs)


def test_secret_not_in_repr() -> None:
    s = Settings(signing_secret="s3cret", celery_key_prefix="t1:")
    assert "s3cret" not in repr(s)
    assert s.celery_transport_options()["global_keyprefix"] == "t1:"
