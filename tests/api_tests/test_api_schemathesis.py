"""The published OpenAPI document against the running API: a bounded schemathesis run (every
check, every phase, a few hundred cases) on a real server on 127.0.0.1. Checks that depend on
state are switched off per operation in schemathesis.toml, each with its reason."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from test_api_datasets import served

from app_common.settings import Settings
from app_common.store import JobStore

CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_the_api_keeps_its_published_schema(store: JobStore, settings: Settings, tmp_path: Path) -> None:
    # Quotas would answer 429 to valid submissions: out of the way here (the rate limit and the
    # active-job cap have tests of their own).
    settings = settings.model_copy(update={"max_concurrent_jobs_per_key": 100_000, "max_epochs": 2,
                                           "max_megabatches": 2})
    owner, secret = store.create_key("schemathesis")
    stop = threading.Event()
    # In place of a worker: jobs end soon after they are queued, so their event streams end too.
    finisher = threading.Thread(target=_finish_jobs, args=(store, owner, stop), daemon=True)
    finisher.start()
    with served(settings) as base:
        command = [
            sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run", f"{base}/openapi.json",
            "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", "15", "--seed", "11",
            "-H", f"Authorization: Bearer {secret}", "--no-color", "--request-timeout", "30",
        ]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
        finally:
            stop.set()
            finisher.join(timeout=10)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    cases = re.search(r"(\d+) generated", result.stdout)
    assert cases is not None and int(cases[1]) >= 200, result.stdout[-2000:]



def _finish_jobs(store: JobStore, owner: str, stop: threading.Event) -> None:
    while not stop.wait(0.2):
        for status in ("queued", "running", "cancelling"):
            for record in store.list_jobs(owner, status=status, limit=100)[0]:
                store.transition(record.id, "cancelled", reason="test", allowed_from={status})
