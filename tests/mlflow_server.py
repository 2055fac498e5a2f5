"""A real MLflow tracking server for tests: ``mlflow server`` on 127.0.0.1 with a SQLite backend
and a local artifact root, served through the server (``mlflow-artifacts:/``), as a team would run
it. Not a test module (no ``test_`` prefix); ``conftest.py`` starts one per session.

Start-up imports MLflow twice (the CLI, then its uvicorn worker) and creates the database tables:
several seconds on an idle machine, much longer on a loaded one, so the wait is generous. The
server's background job runner (a dozen huey consumers, for GenAI features) is switched off.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from service_stack import free_port, stop_process


@dataclass(frozen=True)
class MlflowServer:
    url: str
    folder: Path  # the database, the artifact root and the server's log

    @property
    def artifacts_dir(self) -> Path:
        return self.folder / "artifacts"


def mlflow_binary() -> str | None:
    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.exists() else shutil.which("mlflow")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def run_mlflow_server(folder: Path, *, startup_timeout_s: float = 240.0) -> Iterator[MlflowServer]:
    binary = mlflow_binary()
    if binary is None:
        raise RuntimeError("the 'mlflow' command is missing: pip install mlflow (the dev extra has it)")
    folder.mkdir(parents=True, exist_ok=True)
    artifacts = folder / "artifacts"
    port = free_port()
    argv = [
        binary, "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"})
    log_path = folder / "mlflow-server.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=folder, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer in {startup_timeout_s:.0f} s: "
                                   f"{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield MlflowServer(url=url, folder=folder)
    finally:
        # Nothing to keep: SIGKILL spares the graceful shutdown's seconds (uvicorn waits for idle
        # keep-alive connections, the CLI for its worker).
        stop_process(proc, timeout=0.0)
