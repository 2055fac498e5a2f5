"""`anytime-prune serve` loses nothing when it restarts, and leaves nothing behind when killed.

The embedded Redis keeps its data in the state folder (append-only file), the link-signing secret
is kept there too, and a job that was running when serve stopped is picked up again by the
reaper after the restart. Real `serve` subprocesses, real HTTP, real training on digits.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from service_stack import TINY_SPEC, cli_argv, free_port

from anytime_prune.client import Client

pytestmark = pytest.mark.slow


class Serve:
    """One `anytime-prune serve` in ``folder`` (its cwd, HOME and state folder)."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.home = folder / "home"
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("APP_")}
        env.pop("XDG_CONFIG_HOME", None)
        # A short lease: the reaper notices the job orphaned by a stop within seconds.
        env.update(HOME=str(self.home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", APP_JOB_LEASE_TTL_S="2")
        self.proc = subprocess.Popen(
            cli_argv("serve", "--port", str(port), "--state-dir", str(folder / "state"),
                     "--artifacts-dir", str(folder / "artifacts"), "--stop-timeout", "3"),
            env=env, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        assert self.ready.wait(120), "".join(self.lines)
        assert self.proc.poll() is None, "".join(self.lines)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("Press Ctrl-C"):
                self.ready.set()
        self.ready.set()

    def client(self) -> Client:
        return Client.from_env(environ={"HOME": str(self.home)})

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(timeout=60) == 0, "".join(self.lines)
        self.close()

    def close(self) -> None:
        """After the process ended: the reader has seen end of file, so the pipe can go."""
        self.reader.join(timeout=30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # Whatever a failed test left running in this folder goes now.
    for proc in psutil.process_iter():
        try:
            if str(tmp_path) in " ".join(proc.cmdline()) or proc.cwd().startswith(str(tmp_path)):
                proc.kill()
        except (psutil.Error, OSError):
            continue


def _download(url: str) -> str:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    return hashlib.sha256(response.content).hexdigest()


def test_a_restart_keeps_jobs_keys_events_links_and_resumes_a_running_job(folder: Path) -> None:
    port = free_port()
    serve = Serve(folder, port)
    with serve.client() as client:
        key_before = client.api_key
        done = client.wait(client.submit(TINY_SPEC)["id"], timeout=300)
        assert done["status"] == "succeeded"
        metrics = client.metrics(done["id"])
        events = [(e.id, e.type) for e in client.events(done["id"])]
        links = client.artifacts(done["id"])
        # A longer job, stopped with serve once its first megabatch is done.
        long_spec: dict[str, Any] = dict(TINY_SPEC, stream={"megabatches": 4}, training={"epochs": 4, "seed": 3})
        running = client.submit(long_spec)["id"]
        for event in client.events(running):
            if event.type == "megabatch_ended":
                break
    serve.stop()

    again = Serve(folder, port)
    try:
        with again.client() as client:
            assert client.api_key == key_before  # the same key still works
            assert {j["id"] for j in client.list()} == {done["id"], running}
            assert client.status(done["id"])["status"] == "succeeded"
            assert client.metrics(done["id"]) == metrics
            assert [(e.id, e.type) for e in client.events(done["id"])] == events
            for link in links:  # signed before the restart, with the kept secret
                assert _download(link["download_url"]) == link["sha256"]
            # The job cut off by the stop is resumed by the new worker (hang guard: 10x a normal run).
            resumed = client.wait(running, timeout=600)
            assert resumed["status"] == "succeeded", resumed
            assert resumed["attempt"] >= 2
            assert [m["megabatch"] for m in client.metrics(running)["megabatches"]] == [1, 2, 3, 4]
    finally:
        again.stop()


def test_serve_killed_by_sigkill_leaves_no_process_and_the_next_start_works(folder: Path) -> None:
    port = free_port()
    serve = Serve(folder, port)
    children = psutil.Process(serve.proc.pid).children(recursive=True)
    names = " ".join(" ".join(c.cmdline()) for c in children)
    assert "redis-server" in names and " worker " in names and " api " in names, names
    os.kill(serve.proc.pid, signal.SIGKILL)
    serve.proc.wait(timeout=10)
    serve.close()
    gone, alive = psutil.wait_procs(children, timeout=30)  # hang guard; they go within seconds
    assert not alive, [" ".join(p.cmdline()) for p in alive]

    again = Serve(folder, port)
    try:
        with again.client() as client:
            assert client.list() == []  # the same (empty) store answers, with the same key
    finally:
        again.stop()
