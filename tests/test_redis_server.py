"""EmbeddedRedis: the bundled redis-server starts on a free port and stops cleanly."""

from __future__ import annotations

import pytest
import redis

from app_common.redis_server import EmbeddedRedis, RedisServerError, find_redis_server


def test_find_binary() -> None:
    assert find_redis_server().endswith("redis-server")


def test_start_use_stop() -> None:
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url, socket_timeout=2)
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert client.config_get("save")["save"] == ""
        assert client.config_get("appendonly")["appendonly"] == "no"
        client.close()
        url = server.url
    with pytest.raises(RedisServerError):
        _ = server.url
    dead = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    with pytest.raises(redis.exceptions.ConnectionError):
        dead.ping()
    dead.close()


def test_missing_binary() -> None:
    with pytest.raises(RedisServerError):
        EmbeddedRedis(executable="/nonexistent/redis-server", startup_timeout_s=0.5).start()
