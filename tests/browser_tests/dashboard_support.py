"""What the browser tests share: the running ``serve``, a tab (a page in its own browser context,
recording its requests and script errors), sign-in and waiting helpers."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anytime_prune.client import Client

CHROMIUM_NAMES = ("chromium", "chromium-browser")
# The two sizes of the issue.
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


NO_CHROMIUM = ("Chromium is not installed: install the Debian package 'chromium' (apt-get install chromium) "
               "to run the browser tests")


def chromium_path() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Serve:
    """A running ``anytime-prune serve``: its URL, its development key, its output so far."""

    url: str
    home: Path
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @property
    def api_key(self) -> str:
        with self.client() as client:
            return str(client.api_key)

    def client(self) -> Client:
        return Client.from_env(environ={"HOME": str(self.home)})

    def output(self) -> str:
        return "".join(self.lines[-80:])


@dataclass
class Tab:
    """A page in a fresh browser context (its own sessionStorage), with what it requested and
    every script error it raised."""

    page: Any
    requests: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)


def open_tab(browser: Any, viewport: dict[str, int] = DESKTOP) -> tuple[Any, Tab]:
    context = browser.new_context(viewport=viewport, accept_downloads=True)
    page = context.new_page()
    tab = Tab(page)
    context.on("request", lambda request: tab.requests.append(request))
    page.on("pageerror", lambda exc: tab.errors.append(str(exc)))
    page.on("console", lambda msg: tab.console.append(f"{msg.type}: {msg.text}"))
    page.set_default_timeout(30_000)
    return context, tab


def sign_in(tab: Tab, serve: Serve) -> None:
    page = tab.page
    page.goto(serve.url + "/")
    page.fill("#api-key", serve.api_key)
    page.click("#sign-in-button")
    page.wait_for_selector("#jobs-updated:not(:empty)")


def wait_for_status(client: Client, job_id: str, statuses: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.status(job_id)
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job {job_id} is still {job['status']}"
        time.sleep(0.3)
