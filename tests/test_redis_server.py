"""EmbeddedRedis: the bundled redis-server starts on a free port and stops cleanly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis

from app_common.redis_server import PID_FILE, EmbeddedRedis, RedisServerError, find_redis_server, reclaim_stale_server

ROOT = Path(__file__).resolve().parents[1]


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


def test_data_dir_keeps_the_data_across_restarts(tmp_path: Path) -> None:
    with EmbeddedRedis(data_dir=tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url, socket_timeout=2)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "everysec"
        client.set("job", "kept")
        client.close()
    with EmbeddedRedis(data_dir=tmp_path / "redis") as again:
        client = redis.Redis.from_url(again.url, socket_timeout=2)
        assert client.get("job") == b"kept"
        client.close()


def _alive(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def test_the_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A parent killed with SIGKILL (a closed terminal, the OOM killer) leaves no redis-server."""
    script = (
        "import sys, time; from pathlib import Path; from app_common.redis_server import EmbeddedRedis\n"
        f"s = EmbeddedRedis(data_dir=Path({str(tmp_path / 'redis')!r})).start()\n"
        "print(s._process.pid, flush=True); time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    assert _alive(pid)
    parent.kill()
    parent.wait(timeout=10)
    parent.stdout.close()
    deadline = time.monotonic() + 20  # hang guard; the server stops within a second or so
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_a_stale_server_on_the_folder_is_reclaimed(tmp_path: Path) -> None:
    folder = tmp_path / "redis"
    folder.mkdir()
    # A server started without a parent-death signal, as older versions did: it outlives us.
    stale = subprocess.Popen(
        [find_redis_server(), "--port", str(free_port()), "--bind", "127.0.0.1", "--dir", str(folder),
         "--pidfile", str(folder / PID_FILE), "--appendonly", "yes", "--save", ""],
        stdout=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not (folder / PID_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with EmbeddedRedis(data_dir=folder) as server:
            assert stale.wait(timeout=20) == 0  # stopped cleanly by SIGTERM
            client = redis.Redis.from_url(server.url, socket_timeout=2)
            assert client.ping()
            client.close()
    finally:
        if stale.poll() is None:
            stale.kill()
            stale.wait()


def test_reclaim_leaves_other_processes_alone(tmp_path: Path) -> None:
    folder = tmp_path / "redis"
    folder.mkdir()
    (folder / PID_FILE).write_text(str(os.getpid()))  # a pid file naming something else
    assert reclaim_stale_server(folder) is None
    (folder / PID_FILE).write_text("not a pid")
    assert reclaim_stale_server(folder) is None
