"""The published OpenAPI document against the running API: a bounded schemathesis run (every
check, every phase, a few hundred cases) on a real server on 127.0.0.1. Checks that depend on
state are switched off per operation in schemathesis.toml, each with its reason."""

from __future__ import annotations

import os
import subprocess
import sys
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
    _, secret = store.create_key("schemathesis")
    with served(settings) as base:
        command = [
            sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run", f"{base}/openapi.json",
            "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", "8", "--seed", "11",
            "-H", f"Authorization: Bearer {secret}", "--no-color", "--request-timeout", "30",
        ]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
