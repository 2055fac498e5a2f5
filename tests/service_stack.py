"""A real service for end-to-end tests: the API (``anytime-prune api``, uvicorn), a Celery
worker (``anytime-prune worker --queue cpu``) and a control worker (``--queue control``, dataset
validation) as subprocesses on a real Redis, with their own key
prefix and temporary artifacts and data folders.

Used by ``test_client.py`` and ``test_e2e.py`` through a module-scoped fixture, so one stack serves
a whole test file. Not a test module itself (no ``test_`` prefix).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from anytime_prune.client import Client
from app_common.store import JobStore, make_redis

ROOT = Path(__file__).resolve().parents[1]

# A digits job that finishes in seconds on one CPU thread and still learns (test accuracy ~0.9).
TINY_SPEC: dict[str, Any] = {
    "dataset": {"name": "digits"},
    "architecture": "mlp",
    "method": "app",
    "sparsity": {"target": 0.5},
    "stream": {"megabatches": 2},
    "training": {"epochs": 2, "precision": "fp32", "seed": 3},
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cli_argv(*args: str) -> list[str]:
    """``anytime-prune ARGS`` with this interpreter (the console script may be another one's)."""
    return [sys.executable, "-m", "anytime_prune.cli", *args]


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM the process group of ``proc`` (started with start_new_session), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    # Pool children of a worker live in the same group and may outlive the leader.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@dataclass
class ServiceStack:
    url: str
    env: dict[str, str]
    store: JobStore
    artifacts_dir: Path
    data_dir: Path
    storage_dir: Path  # the local object store (unless extra_env names another, APP_STORAGE_URL)
    folder: Path
    prefix: str
    logs: dict[str, Path] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    retired: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def start(self, name: str, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``anytime-prune ARGS`` as ``name``, in its own process group, logging to a file
        (appended to, so a restarted process keeps its predecessor's log); ``extra_env`` adds to
        the stack's environment for this process only (a worker on another "host")."""
        log_path = self.folder / f"{name}.log"
        self.logs[name] = log_path
        with open(log_path, "ab") as handle:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                cli_argv(*args), env={**self.env, **(extra_env or {})}, cwd=ROOT, stdout=handle,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        if name in self.processes:
            self.retired.append(self.processes[name])
        self.processes[name] = proc
        return proc

    def start_worker(self) -> subprocess.Popen[bytes]:
        return self.start("worker", "worker", "--queue", "cpu", "--hostname", f"{self.prefix}@%h")

    def start_control_worker(self) -> subprocess.Popen[bytes]:
        return self.start("control", "worker", "--queue", "control", "--hostname", f"{self.prefix}-control@%h")

    def crash_worker(self) -> None:
        """SIGKILL the worker's whole process group (main process and the pool child running a
        job): a machine lost mid-job, nothing gets to clean up."""
        proc = self.processes["worker"]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def new_key(self, name: str = "test") -> tuple[str, str]:
        """(key_id, secret) of a fresh API key."""
        return self.store.create_key(name)

    def client(self, secret: str | None, **kwargs: Any) -> Client:
        return Client(self.url, secret, **kwargs)

    def cli(self, *args: str, secret: str | None = None, timeout: float = 120.0,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``anytime-prune ARGS`` against this stack (``--url`` and ``--api-key`` are passed
        through the environment, as a pipeline would)."""
        env = dict(self.env)
        env["ANYTIME_PRUNE_URL"] = self.url
        if secret is not None:
            env["ANYTIME_PRUNE_API_KEY"] = secret
        env.update(extra_env or {})
        return subprocess.run(cli_argv(*args), env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            out.append(f"--- {name} ---\n" + "\n".join(text))
        return "\n".join(out)

    def check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.log_tail()}")


def _wait_ready(stack: ServiceStack, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stack.check_alive()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{stack.url}/readyz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the API did not become ready\n{stack.log_tail()}")


def _delete_prefixed(client: redis.Redis, prefix: str) -> None:
    for key in client.scan_iter(match=f"{prefix}*", count=500):
        client.delete(key)


@contextlib.contextmanager
def service_stack(redis_url: str, folder: Path, *, worker: bool = True,
                  extra_env: dict[str, str] | None = None) -> Iterator[ServiceStack]:
    """Start the API (and a cpu worker) on ``redis_url`` under a fresh prefix; stop them and
    delete the prefix's keys afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    artifacts, data, storage = folder / "artifacts", folder / "data", folder / "storage"
    artifacts.mkdir(parents=True)
    data.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APP_", "ANYTIME_PRUNE_"))}
    env.update(
        {
            "REDIS_URL": redis_url,
            "APP_REDIS_PREFIX": prefix,
            # Celery's queues under the same prefix: another stack (or a person's worker) on the
            # same Redis cannot take these jobs, and cleaning up the prefix removes them.
            "APP_CELERY_KEY_PREFIX": f"{prefix}:",
            "APP_ARTIFACTS_DIR": str(artifacts),
            "APP_DATA_DIR": str(data),
            "APP_STORAGE_DIR": str(storage),
            "APP_CACHE_DIR": str(folder / "cache"),
            "APP_SIGNING_SECRET": uuid.uuid4().hex,
            "APP_QUEUES": "cpu",
            "APP_DEFAULT_QUEUE": "cpu",
            # Idle event streams send a heartbeat every second, so tests notice drops quickly.
            "APP_SSE_HEARTBEAT_S": "1",
            # Short leases: a crashed worker's job is taken over (and reaped) within seconds.
            "APP_JOB_LEASE_TTL_S": "5",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            # No credentials file of the person running the tests can leak in.
            "HOME": str(folder / "home"),
        }
    )
    env.pop("XDG_CONFIG_HOME", None)
    env.update(extra_env or {})
    port = free_port()
    redis_client = make_redis(redis_url, timeout_s=5.0)
    stack = ServiceStack(
        url=f"http://127.0.0.1:{port}",
        env=env,
        store=JobStore(redis_client, prefix=prefix),
        artifacts_dir=artifacts,
        data_dir=data,
        storage_dir=storage,
        folder=folder,
        prefix=prefix,
    )
    try:
        stack.start("api", "api", "--port", str(port), "--no-access-log")
        if worker:
            stack.start_worker()
            stack.start_control_worker()
        _wait_ready(stack)
        yield stack
    finally:
        for proc in [*stack.processes.values(), *stack.retired]:
            stop_process(proc)
        _delete_prefixed(redis_client, prefix)
        redis_client.close()
