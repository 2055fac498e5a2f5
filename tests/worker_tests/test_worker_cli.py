"""worker/cli.py: the worker's command line, its CPU share and its start-up warnings."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from worker_support import REPO

from app_common.settings import Settings
from worker import cli


def test_worker_argv_is_one_job_at_a_time_on_known_queues() -> None:
    argv = cli.worker_argv("gpu", hostname="g@h")
    assert argv[argv.index("--queues") + 1] == "gpu" and argv[argv.index("--concurrency") + 1] == "1"
    assert argv[argv.index("--max-tasks-per-child") + 1] == "1"
    with pytest.raises(ValueError, match="unknown queue"):
        cli.worker_argv("tpu")


def test_share_the_machine_lowers_priority_and_bounds_torch_threads() -> None:
    # In a child process: a raised niceness cannot be lowered again.
    code = (
        "import json, os; from app_common.settings import Settings; from worker.cli import share_the_machine\n"
        "before = os.nice(0)\n"
        "share_the_machine(Settings(redis_url='redis://x', worker_nice=7, torch_threads=1))\n"
        "print(json.dumps([os.nice(0) - before, os.environ['OMP_NUM_THREADS']]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == [7, "1"]


def test_a_worker_on_a_queue_the_api_never_uses_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    started: list[list[str]] = []

    class FakeApp:
        def start(self, argv: list[str]) -> int:
            started.append(argv)
            return 0

    monkeypatch.setattr("worker.celery_app.make_celery", lambda settings: FakeApp())
    settings = Settings(redis_url="redis://127.0.0.1:1/0", queues=("cpu",), default_queue="cpu")
    with caplog.at_level(logging.WARNING, logger="worker.cli"):
        assert cli.run_worker("gpu", settings) == 0
        assert cli.run_worker("cpu", settings) == 0
        assert cli.run_worker("control", settings) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'gpu'" in warnings[0] and "APP_QUEUES=cpu" in warnings[0]
    assert len(started) == 3
