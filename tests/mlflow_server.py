"""A real MLflow tracking server for tests: ``mlflow server`` on 127.0.0.1 with a SQLite backend
and a local artifact root, served through the server (``mlflow-artifacts:/``), as a team would run
it. Not a test module (no ``test_`` prefix); ``conftest.py`` starts one per session.

Start-up imports MLflow twice (the CLI, then its uvicorn worker) and creates the database tables:
several seconds on an idle machine, much longer on a loaded one, so the wait is generous. The
server's background job runner (a dozen huey consumers, for GenAI features) is switched off.

:func:`gated_proxy` puts a real HTTP server in front of it that holds every request until the test
opens its gate: a tracking server far slower than training, or (never opened) a dead one that
accepts connections and never answers.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

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


# Headers of one connection, not of the message: never relayed.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                         "upgrade", "host", "content-length", "server", "date"})


class GatedProxy(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that reads each request at once, then holds it until
    :meth:`open` and relays it to ``target`` (and the answer back). ``received`` and ``answered``
    count requests."""

    daemon_threads = True

    def __init__(self, target: str) -> None:
        super().__init__(("127.0.0.1", 0), _Relay)
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.gate = threading.Event()
        self.received = 0
        self.answered = 0
        self.first_request = threading.Event()
        self._count = threading.Lock()

    def open(self) -> None:
        self.gate.set()

    def count(self, *, answered: bool) -> None:
        with self._count:
            if answered:
                self.answered += 1
            else:
                self.received += 1
                self.first_request.set()


class _Relay(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: GatedProxy

    def relay(self) -> None:
        body = self._body()
        self.server.count(answered=False)
        self.server.gate.wait()
        upstream = http.client.HTTPConnection(*self.server.target, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.server.count(answered=True)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = relay

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 -- the base class's name
        pass


@contextlib.contextmanager
def gated_proxy(target: str) -> Iterator[GatedProxy]:
    """A :class:`GatedProxy` in front of ``target``; at the end its gate opens (what it still
    holds goes through) and it stops."""
    proxy = GatedProxy(target)
    thread = threading.Thread(target=proxy.serve_forever, name="gated-proxy", daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.open()
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=10)
