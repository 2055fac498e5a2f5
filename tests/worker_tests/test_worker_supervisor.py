"""worker/supervisor.py: ``anytime-prune worker --gpus``, one worker per device, with CPU stand-ins
for the GPUs (CUDA_VISIBLE_DEVICES pins to ids that no CUDA ever reads on this machine)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import psutil
import pytest
from service_stack import TINY_SPEC, service_stack

from worker.supervisor import ChildSpec, NoGpuError, Supervisor, child_specs, node_name, resolve_devices


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_gpus_all_takes_the_visible_devices_and_says_when_there_are_none() -> None:
    assert resolve_devices("0,2", env={}) == ["0", "2"]
    assert resolve_devices(" 1 , 3 ", env={"CUDA_VISIBLE_DEVICES": "0"}) == ["1", "3"]
    # all: CUDA_VISIBLE_DEVICES when set (up to its first invalid entry), else nvidia-smi -L.
    assert resolve_devices("all", env={"CUDA_VISIBLE_DEVICES": "2,3"}, list_gpus=lambda: ["0"]) == ["2", "3"]
    assert resolve_devices("all", env={"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == ["1"]
    assert resolve_devices("all", env={}, list_gpus=lambda: ["0", "1", "2", "3"]) == ["0", "1", "2", "3"]
    for env, gpus in (({}, []), ({"CUDA_VISIBLE_DEVICES": ""}, ["0"]), ({"CUDA_VISIBLE_DEVICES": "-1"}, ["0"])):
        with pytest.raises(NoGpuError, match="no GPU is visible"):
            resolve_devices("all", env=env, list_gpus=lambda g=gpus: g)  # type: ignore[misc]
    for bad in ("", "0,,1", "0,0", "0;1"):
        with pytest.raises(ValueError, match="--gpus"):
            resolve_devices(bad, env={})


def test_each_child_is_a_worker_pinned_to_its_device_and_named_after_it() -> None:
    env = {"REDIS_URL": "redis://r", "CUDA_VISIBLE_DEVICES": "0,3"}
    specs = child_specs(["0", "3"], "gpu", loglevel="DEBUG", env=env, executable="/py")
    assert [s.device for s in specs] == ["0", "3"]
    for spec, name in zip(specs, ("gpu0@%h", "gpu3@%h"), strict=True):
        assert spec.argv == ["/py", "-m", "anytime_prune.cli", "worker", "--queue", "gpu", "--loglevel", "DEBUG",
                             "--hostname", name]
        assert spec.env == {"REDIS_URL": "redis://r", "CUDA_VISIBLE_DEVICES": spec.device}
    assert node_name("1", "cpu", "test-x@%h") == "test-x1@%h"
    assert node_name("GPU-ab12", "gpu", "w@box") == "wGPU-ab12@box"


def test_a_killed_child_is_restarted_and_stopping_stops_every_child() -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    specs = [ChildSpec(d, sleeper, {**os.environ, "CUDA_VISIBLE_DEVICES": d}) for d in ("0", "1")]
    supervisor = Supervisor(specs, grace_s=5, poll_s=0.1, backoff_min_s=0.2)
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(supervisor.pids()) == 2, 30, "two children")
        first = supervisor.pids()
        for device, pid in first.items():
            assert psutil.Process(pid).environ()["CUDA_VISIBLE_DEVICES"] == device
        os.kill(first["0"], signal.SIGKILL)
        wait_until(lambda: supervisor.pids().get("0") not in (None, first["0"]), 30, "device 0 restarted")
        restarted = supervisor.pids()
        assert restarted["1"] == first["1"] and supervisor.restarts() == {"0": 1, "1": 0}
        assert psutil.Process(restarted["0"]).environ()["CUDA_VISIBLE_DEVICES"] == "0"
    finally:
        supervisor.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert all(gone(pid) for pid in (*first.values(), *restarted.values()))


@pytest.mark.timeout(180)
def test_two_jobs_run_at_once_on_two_stand_in_devices_and_sigterm_leaves_no_orphan(
    redis_url: str, tmp_path: Path
) -> None:
    with service_stack(redis_url, tmp_path, worker=False) as stack:
        supervisor = stack.start("workers", "worker", "--gpus", "0,1", "--queue", "cpu",
                                 "--hostname", f"{stack.prefix}@%h")
        names = [f"{stack.prefix}0@", f"{stack.prefix}1@"]

        def both_ready() -> bool:
            stack.check_alive()
            lines = stack.logs["workers"].read_text(errors="replace").splitlines()
            return all(any(name in line and "ready." in line for line in lines) for name in names)

        wait_until(both_ready, 90, f"both workers ready\n{stack.log_tail()}")
        workers = psutil.Process(supervisor.pid).children()
        assert sorted(w.environ()["CUDA_VISIBLE_DEVICES"] for w in workers) == ["0", "1"]
        assert sorted(next(a for a in w.cmdline() if a.startswith(stack.prefix)) for w in workers) == [
            f"{stack.prefix}0@%h", f"{stack.prefix}1@%h"]

        _, secret = stack.new_key()
        with stack.client(secret) as client:
            ids = [client.submit(TINY_SPEC)["id"] for _ in range(2)]
            both_running = False

            def finished() -> bool:
                nonlocal both_running
                statuses = [client.status(i)["status"] for i in ids]
                both_running |= statuses == ["running", "running"]
                return all(s in ("succeeded", "failed", "cancelled") for s in statuses)

            wait_until(finished, 120, f"both jobs to finish\n{stack.log_tail()}")
            jobs = [client.status(i) for i in ids]
        assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], stack.log_tail()
        started = [datetime.fromisoformat(j["started_at"]) for j in jobs]
        ended = [datetime.fromisoformat(j["finished_at"]) for j in jobs]
        # Each ran on its own worker: one started before the other had finished.
        assert both_running or max(started) < min(ended), (started, ended)

        tree = [p.pid for p in psutil.Process(supervisor.pid).children(recursive=True)]
        assert len(tree) >= 2
        os.kill(supervisor.pid, signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0
        wait_until(lambda: all(gone(pid) for pid in tree), 30, "every worker process to exit")
