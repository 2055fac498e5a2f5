"""Fixtures of the browser tests: one real ``anytime-prune serve`` (embedded Redis, API, training and
control workers) and one headless Chromium, shared by a test module.

The browser is Debian's ``chromium`` driven by Playwright for Python (``executable_path``): nothing
downloads a browser. Without it the browser tests skip, naming the package to install.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from dashboard_support import NO_CHROMIUM, Serve, Tab, chromium_path, open_tab
from service_stack import cli_argv, free_port


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    # Module scope, like the browser: Playwright's sync API runs an event loop on this thread,
    # which must be gone before any later module's async tests run theirs.
    if chromium_path() is None:  # no server to start for tests that will skip
        pytest.skip(NO_CHROMIUM)
    folder = tmp_path_factory.mktemp("dashboard-serve")
    home = folder / "home"
    env = {k: v for k, v in os.environ.items()
           if k != "REDIS_URL" and not k.startswith(("APP_", "ANYTIME_PRUNE_"))}
    env.pop("XDG_CONFIG_HOME", None)
    # Heartbeats every second keep the page's event stream moving; one torch thread per job.
    env.update(HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", APP_SSE_HEARTBEAT_S="1")
    port = free_port()
    proc = subprocess.Popen(
        cli_argv("serve", "--port", str(port), "--state-dir", str(folder / "state"),
                 "--artifacts-dir", str(folder / "artifacts"), "--stop-timeout", "3"),
        env=env, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    running = Serve(url=f"http://127.0.0.1:{port}", home=home, proc=proc)
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            running.lines.append(line)
            if line.startswith("Press Ctrl-C"):
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(180), running.output()  # hang guard: start-up takes seconds
        assert proc.poll() is None, running.output()
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    if executable is None:
        pytest.skip(NO_CHROMIUM)
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def tab(browser: Any) -> Iterator[Tab]:
    context, opened = open_tab(browser)
    try:
        yield opened
    finally:
        context.close()
    assert not opened.errors, opened.errors
