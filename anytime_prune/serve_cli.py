"""Running the service: ``serve`` (Redis, one worker and the API on this machine, under one
process supervisor), and the parts alone, ``api`` and ``worker``.

``api`` needs fastapi, ``worker`` celery; the engine (torch) is loaded only inside a worker's job.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from anytime_prune.client_cli import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    EXIT_OK,
    EXIT_SERVICE_ERROR,
    exit_for,
    follow,
    quiet_http_logs,
    report_api_error,
    summarise_final,
)
from app_common.tasks import CONTROL_QUEUE, QUEUE_NAMES

if TYPE_CHECKING:
    from app_common.store import JobStore

log = logging.getLogger("anytime_prune")


# The demo job of ``serve --demo``: small enough for a laptop CPU in well under a minute, big
# enough to show APP pruning a network to 36.6 % density over a stream of 4 megabatches.
DEMO_SPEC: dict[str, Any] = {
    "dataset": {"name": "digits"},
    "architecture": "cnn_small",
    "method": "app",
    "sparsity": {"target": 0.634},
    "stream": {"megabatches": 4},
    # Batches of 16 give the 323 images of the first megabatch 20 steps an epoch: it already
    # reaches ~0.8 test accuracy (batches of 64 gave 5 steps and 0.12).
    "training": {"epochs": 3, "batch_size": 16},
}


# --- the parts alone ----------------------------------------------------------------------------


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from api.main import create_app
    from app_common.settings import Settings

    settings = Settings()
    if not settings.redis_url:
        print("error: the API needs REDIS_URL (or run `anytime-prune serve`, which starts Redis)", file=sys.stderr)
        return 2
    # The application's own loggers follow --log-level too, not only uvicorn's.
    logging.getLogger().setLevel(args.log_level.upper())
    app = create_app(settings)
    log.info("API on http://%s:%d", args.host, args.port)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=not args.no_access_log,
        proxy_headers=args.forwarded_allow_ips is not None,
        forwarded_allow_ips=args.forwarded_allow_ips,
        # Event streams stay open while a job runs: on shutdown give them this long, then close.
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from app_common.settings import Settings
    from worker.cli import run_worker

    settings = Settings()
    if not settings.redis_url:
        print("error: a worker needs REDIS_URL (or run `anytime-prune serve`, which starts Redis)", file=sys.stderr)
        return 2
    if args.gpus is not None:
        from worker.supervisor import NoGpuError, supervise

        try:
            return supervise(args.gpus, args.queue, loglevel=args.loglevel, hostname=args.hostname)
        except (NoGpuError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return run_worker(args.queue, settings, loglevel=args.loglevel, hostname=args.hostname)


# --- serve: everything on one machine ---------------------------------------------------------


class _Stop(Exception):
    """SIGTERM or SIGHUP arrived: stop everything, like Ctrl-C."""


def _die_with_parent() -> None:
    """In a child before exec (Linux): get SIGTERM if ``serve`` itself dies, even by SIGKILL,
    so that no worker or API outlives it."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


class ProcessGroup:
    """The children of ``serve``, each in its own process group (session): a terminal's Ctrl-C
    reaches only ``serve``, which then stops them all; stopping a child signals its whole group,
    which includes the worker's pool process running a job."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )
        self.children.append((name, proc))
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return proc

    def exited(self) -> list[tuple[str, int]]:
        return [(name, code) for name, proc in self.children if (code := proc.poll()) is not None]

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to every group at once, SIGKILL to what is left after ``grace_s``."""
        for _, proc in self.children:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name, proc in self.children:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", name, grace_s)
        for _, proc in self.children:
            # The leader may be gone while its group lives on (a pool child): kill the group.
            if _group_alive(proc.pid):
                time.sleep(0.5)
                _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.children.clear()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _client_url(host: str, port: int) -> str:
    # A server bound to every interface is reached locally through the loopback address.
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://{shown}:{port}"


def _wait_ready(url: str, group: ProcessGroup, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if dead := group.exited():
            raise RuntimeError(", ".join(f"{n} exited with status {c}" for n, c in dead) + " during start-up")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the API at {url} was not ready within {timeout_s:.0f} s")


def _self_command(*args: str) -> list[str]:
    """This program run again with the same interpreter (not whatever is first on PATH)."""
    return [sys.executable, "-m", "anytime_prune.cli", *args]


def _dev_key(store: JobStore, previous: dict[str, Any] | None, redis_url: str) -> tuple[str, str]:
    """A development API key: the one of the last ``serve`` if it still works on this Redis (the
    embedded Redis keeps its data in the state folder, and so does a persistent REDIS_URL), else a
    new one."""
    if previous and previous.get("api_key"):
        owner = store.owner_for_secret(previous["api_key"])
        if owner is not None:
            return owner, str(previous["api_key"])
    key_id, secret = store.create_key("serve development key")
    return key_id, secret


def _signing_secret(path: Path) -> str:
    """The secret stored at ``path`` (0600), created on first use."""
    if path.exists():
        secret = path.read_text().strip()
        if secret:
            return secret
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    return secret


def cmd_serve(args: argparse.Namespace) -> int:
    from anytime_prune.client import credentials_path, read_credentials, write_credentials
    from app_common.redis_server import EmbeddedRedis
    from app_common.settings import Settings
    from app_common.store import JobStore, make_redis

    quiet_http_logs()
    url = _client_url(args.host, args.port)
    if not _port_free(args.host, args.port):
        print(f"error: {args.host}:{args.port} is in use (another `anytime-prune serve`?); pick one with --port",
              file=sys.stderr)
        return 2

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # Set explicitly: a shell starts background jobs with SIGINT ignored, and Python then keeps
    # it ignored; serve must stop on Ctrl-C wherever it was started from.
    signal.signal(signal.SIGINT, on_interrupt)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    group = ProcessGroup()
    embedded: EmbeddedRedis | None = None
    code = 0
    try:
        # Everything is configured through the environment, which the children inherit: the
        # API and the worker read the very same settings as this process.
        state_dir = Path(args.state_dir).resolve()
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.environ.get("REDIS_URL"):
            # Jobs, events and keys survive a restart: the embedded Redis keeps them here.
            embedded = EmbeddedRedis(data_dir=state_dir / "redis").start()
            os.environ["REDIS_URL"] = embedded.url
        if not os.environ.get("APP_SIGNING_SECRET"):
            # The same secret on every start: download links given out before a restart still work.
            os.environ["APP_SIGNING_SECRET"] = _signing_secret(state_dir / "signing-secret")
        if args.artifacts_dir:
            os.environ["APP_ARTIFACTS_DIR"] = str(Path(args.artifacts_dir).resolve())
        if args.data_dir:
            os.environ["APP_DATA_DIR"] = str(Path(args.data_dir).resolve())
        # The one worker serves --queue, so that is where jobs must go.
        os.environ.setdefault("APP_QUEUES", args.queue)
        os.environ.setdefault("APP_DEFAULT_QUEUE", args.queue)
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        # The API shares this machine with training: the workers run at a lower priority and leave
        # one core free of torch threads, so requests are answered promptly (bench/bench_api.py).
        os.environ.setdefault("APP_WORKER_NICE", "10")
        os.environ.setdefault("APP_TORCH_THREADS", str(max(1, (os.cpu_count() or 2) - 1)))
        settings = Settings()
        if args.queue not in settings.queues:
            raise RuntimeError(f"APP_QUEUES={','.join(settings.queues)} does not include --queue {args.queue}")
        settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
        redis_url = str(settings.redis_url)

        store = JobStore(make_redis(redis_url, timeout_s=5.0), prefix=settings.redis_prefix)
        creds_file = credentials_path()
        key_id, api_key = _dev_key(store, read_credentials(creds_file), redis_url)
        store.redis.close()
        write_credentials(
            {"url": url, "api_key": api_key, "key_id": key_id, "redis_url": redis_url,
             "redis_prefix": settings.redis_prefix, "pid": os.getpid(),
             "written_at": datetime.now(UTC).isoformat(timespec="seconds")},
            creds_file,
        )

        env = dict(os.environ)
        verbose = ["-v"] if args.verbose else []
        level = args.log_level or ("WARNING" if args.demo else "INFO")
        group.spawn("worker", _self_command(*verbose, "worker", "--queue", args.queue, "--loglevel", level), env)
        # Dataset validation and webhook delivery on their own worker: an upload or a webhook never
        # waits behind a training job.
        group.spawn("control worker", _self_command(*verbose, "worker", "--queue", CONTROL_QUEUE, "--loglevel", level),
                    env)
        api_argv = ["api", "--host", args.host, "--port", str(args.port), "--log-level", level.lower()]
        group.spawn("api", _self_command(*verbose, *api_argv, *([] if args.verbose else ["--no-access-log"])), env)
        _wait_ready(url, group, args.startup_timeout)

        redis_line = f"embedded, {redis_url}" if embedded else redis_url.split("@")[-1]
        print(f"anytime-prune is serving on {url}  (API docs: {url}/docs)")
        # The demo is for a first look: it shows the local development key to sign in with.
        sign_in = f"the API key {api_key}" if args.demo else f"the API key in {creds_file}"
        print(f"  dashboard: {url}/  (sign in with {sign_in})")
        print(f"  redis:     {redis_line}")
        print(f"  worker:    1 process on queue {args.queue}, 1 validating uploaded datasets and delivering "
              f"webhooks ({CONTROL_QUEUE})")
        print(f"  artifacts: {settings.artifacts_dir.resolve()}")
        print(f"  API key:   {key_id}, in {creds_file} (the CLI client reads it)")
        print("  try:       anytime-prune submit --dataset digits --megabatches 4 --epochs 3 --watch")
        sys.stdout.flush()

        if args.demo:
            code = _run_demo(url, api_key, Path(args.demo_out))
            if args.exit_after_demo:
                return code
        print("Press Ctrl-C to stop.", flush=True)
        while True:
            if dead := group.exited():
                raise RuntimeError(", ".join(f"{n} exited with status {c}" for n, c in dead))
            time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        print("\nstopping...", file=sys.stderr, flush=True)
        return code
    except (RuntimeError, ValueError) as exc:  # also invalid APP_* settings, an unreadable credentials file
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C while stopping must not leave children behind.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        group.stop(grace_s=args.stop_timeout)
        if embedded is not None:
            embedded.stop()
        log.debug("every process started by serve has stopped")


def _run_demo(url: str, api_key: str, out: Path) -> int:
    """Submit the demo job, follow it live, download its artifacts into ``out``."""
    from anytime_prune.client import ApiError, Client

    print(f"\ndemo: APP on digits, {DEMO_SPEC['architecture']}, {DEMO_SPEC['stream']['megabatches']} megabatches x "
          f"{DEMO_SPEC['training']['epochs']} epochs, target sparsity {DEMO_SPEC['sparsity']['target']}", flush=True)
    try:
        with Client(url, api_key) as client:
            job = client.submit(DEMO_SPEC)
            print(f"demo: job {job['id']} submitted; watch it live at {url}/#/jobs/{job['id']}", flush=True)
            final = follow(client, job["id"])
            summarise_final(final)
            if final["status"] != "succeeded":
                return exit_for(final)
            paths = client.download(job["id"], out)
    except ApiError as exc:
        report_api_error(exc)
        return EXIT_SERVICE_ERROR
    sparse = next((p for p in paths if p.name == "model.sparse.safetensors"), paths[0])
    print(f"demo: downloaded {len(paths)} files (sha256 checked) into {out.resolve()}")
    print(f"demo: sparse checkpoint {sparse.resolve()}")
    print(f"demo: load it with: python -c \"from app_engine.export import load_model; "
          f"print(load_model('{out}'))\"", flush=True)
    return EXIT_OK


# --- the parser -------------------------------------------------------------------------------


def add_serve_commands(sub: Any) -> None:
    """Add ``serve``, ``api`` and ``worker`` to the ``anytime-prune`` parser's subparsers."""
    s = sub.add_parser(
        "serve",
        help="all in one: Redis, one worker and the API on this machine",
        description="Start Redis (embedded unless REDIS_URL is set), one worker and the API; write a "
        "development API key for the CLI client; Ctrl-C stops everything.",
    )
    s.add_argument("--host", default=DEFAULT_HOST)
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument(
        "--state-dir",
        default=os.environ.get("APP_STATE_DIR", "runs"),
        help="where serve keeps the embedded Redis's data and the link-signing secret, so a restart loses "
        "nothing (default: $APP_STATE_DIR or ./runs)",
    )
    s.add_argument("--artifacts-dir", help="where jobs write their files (default: $APP_ARTIFACTS_DIR)")
    s.add_argument("--data-dir", help="root of dataset paths in job specs (default: $APP_DATA_DIR)")
    s.add_argument("--queue", choices=QUEUE_NAMES, default="cpu", help="the queue of the worker")
    s.add_argument("--demo", action="store_true", help="after start-up, run a digits APP job and download it")
    s.add_argument("--demo-out", default="demo-artifacts", help="folder for the demo's artifacts")
    s.add_argument("--exit-after-demo", action="store_true", help="stop once the demo is done (with --demo)")
    s.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="log level of the worker and the API (default INFO, WARNING with --demo)")
    s.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to wait for the API")
    s.add_argument("--stop-timeout", type=float, default=10.0,
                   help="seconds the parts get to stop on Ctrl-C before they are killed")
    s.set_defaults(func=cmd_serve)

    a = sub.add_parser("api", help="the HTTP API alone (uvicorn); settings from the environment")
    a.add_argument("--host", default=DEFAULT_HOST)
    a.add_argument("--port", type=int, default=DEFAULT_PORT)
    a.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    a.add_argument("--no-access-log", action="store_true")
    a.add_argument("--forwarded-allow-ips", help="trust X-Forwarded-* from these proxy IPs (e.g. '*')")
    a.add_argument("--graceful-timeout", type=float, default=5.0, help="seconds open requests get on shutdown")
    a.set_defaults(func=cmd_api)

    w = sub.add_parser("worker", help="a worker (one job at a time); settings from the environment")
    w.add_argument(
        "--queue", choices=(*QUEUE_NAMES, CONTROL_QUEUE), required=True,
        help=f"the Celery queue to consume (one job at a time; '{CONTROL_QUEUE}': dataset validation and webhook "
        "delivery)"
    )
    w.add_argument("--loglevel", default="INFO", type=str.upper)
    w.add_argument("--hostname", help="Celery node name (default: <queue>@<host>; with --gpus, <name><device>@<host>)")
    w.add_argument(
        "--gpus", metavar="all|0,1,...",
        help="run one worker per GPU of this host, each pinned with CUDA_VISIBLE_DEVICES and named after it "
        "(gpu0@<host>, ...), restarting one that dies: 'all' (CUDA_VISIBLE_DEVICES, else nvidia-smi -L) "
        "or device ids",
    )
    w.set_defaults(func=cmd_worker)
