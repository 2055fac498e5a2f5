"""Service sub-commands of ``anytime-prune``: run the service (``serve``, ``api``, ``worker``),
manage API keys (``keys``), and talk to it (``submit``, ``status``, ``watch``, ``list``,
``cancel``, ``download``).

Imports are per sub-command: the client verbs need httpx only (never torch, fastapi or celery),
``api`` needs fastapi, ``worker`` celery; the engine (torch) is loaded only inside a worker's job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from anytime_prune.engine_cli import ConsoleProgress, add_spec_flags, build_spec, megabatch_table, spec_dict_from_args

from app_common.events import EVENT_TYPES, event_from_dict

if TYPE_CHECKING:
    from anytime_prune.client import ApiError, Client, JobEvent
    from app_common.store import JobStore

log = logging.getLogger("anytime_prune")

QUEUES = ("cpu", "gpu")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000

# Exit statuses of the client verbs (``watch`` and ``submit --watch`` report the job's outcome).
EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_JOB_CANCELLED = 3
EXIT_SERVICE_ERROR = 4
EXIT_CODES_HELP = (
    "exit status: 0 the job succeeded (or the command worked), 1 the job failed, 2 bad usage, "
    "3 the job was cancelled, 4 the service answered with an error or could not be reached"
)

# The demo job of ``serve --demo``: small enough for a laptop CPU in well under a minute, big
# enough to show APP pruning a network to 36.6 % density over a stream of 4 megabatches.
DEMO_SPEC: dict[str, Any] = {
    "dataset": {"name": "digits"},
    "architecture": "cnn_small",
    "method": "app",
    "sparsity": {"target": 0.634},
    "stream": {"megabatches": 4},
    "training": {"epochs": 3},
}


# --- client verbs -----------------------------------------------------------------------------


def _quiet_http_logs() -> None:
    # httpx logs every request at INFO: noise on a console that shows a job's progress.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _client(args: argparse.Namespace) -> Client:
    """The client from --url / --api-key, else the environment, else serve's credentials file."""
    from anytime_prune.client import Client

    _quiet_http_logs()
    env = dict(os.environ)
    if args.url:
        env["ANYTIME_PRUNE_URL"] = args.url
    if args.api_key:
        env["ANYTIME_PRUNE_API_KEY"] = args.api_key
    return Client.from_env(environ=env, timeout=args.timeout)


def _client_command(fn: Callable[[argparse.Namespace, Client], int]) -> Callable[[argparse.Namespace], int]:
    """Run ``fn`` with a client; an API error becomes a message and exit status 4."""

    def run(args: argparse.Namespace) -> int:
        from anytime_prune.client import ApiError

        try:
            client = _client(args)
        except ValueError as exc:  # an unreadable credentials file
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_SERVICE_ERROR
        try:
            with client:
                return fn(args, client)
        except ApiError as exc:
            _report_api_error(exc)
            return EXIT_SERVICE_ERROR
        except KeyboardInterrupt:  # Ctrl-C while watching: the job itself keeps running
            print("\ninterrupted (the job is not cancelled; `anytime-prune cancel` does that)", file=sys.stderr)
            return 130

    return run


def _report_api_error(exc: ApiError) -> None:
    print(f"error: {exc}", file=sys.stderr)
    if exc.status == 401:
        print("hint: pass --api-key, set ANYTIME_PRUNE_API_KEY, or start `anytime-prune serve`, which "
              "writes a development key for this client", file=sys.stderr)
    elif exc.status == 0:
        print("hint: is the service running? (`anytime-prune serve`, or pass --url)", file=sys.stderr)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


class EventProgress:
    """Shows a job's event stream as ``run`` shows a local run: a progress bar on a terminal, log
    lines otherwise; status changes are reported as they happen."""

    def __init__(self, label: str = "", *, json_lines: bool = False):
        self.label = label
        self.json_lines = json_lines
        self.console: ConsoleProgress | None = None

    def __call__(self, event: JobEvent) -> None:
        if self.json_lines:
            print(json.dumps({"id": event.id, **event.data}), flush=True)
            return
        if event.type == "status_changed":
            reason = event.data.get("reason")
            line = f"{self.label}status: {event.data.get('status')}" + (f" ({reason})" if reason else "")
            if self.console is not None and self.console.bar is not None:
                self.console.bar.write(line)
            else:
                log.info("%s", line)
            if event.terminal_status:
                self.close()
            return
        if event.type not in EVENT_TYPES:
            return
        try:
            engine_event = event_from_dict(event.data)
        except (TypeError, ValueError):
            log.debug("unreadable event %s: %s", event.type, event.data)
            return
        if event.type == "run_started":
            # A resumed job starts again: a fresh bar continues from the megabatches already done.
            self.close()
            self.console = ConsoleProgress(self.label)
        if self.console is not None:
            self.console(engine_event)

    def close(self) -> None:
        if self.console is not None and self.console.bar is not None:
            self.console.bar.close()
            self.console.bar = None


def _exit_for(job: dict[str, Any]) -> int:
    return {"succeeded": EXIT_OK, "cancelled": EXIT_JOB_CANCELLED}.get(job["status"], EXIT_JOB_FAILED)


def _summarise_final(job: dict[str, Any]) -> None:
    """What a person wants to see when a job ends: the per-megabatch table, or why it did not
    succeed."""
    if job["status"] == "succeeded" and job.get("result"):
        print(megabatch_table(job["result"]))
    elif job["status"] != "succeeded":
        print(f"job {job['id']} {job['status']}" + (f": {job['error']}" if job.get("error") else ""),
              file=sys.stderr)


def _follow(client: Client, job_id: str, *, json_lines: bool = False) -> dict[str, Any]:
    progress = EventProgress(json_lines=json_lines)
    try:
        return client.watch(job_id, callback=progress)
    finally:
        progress.close()


def cmd_submit(args: argparse.Namespace, client: Client) -> int:
    data = spec_dict_from_args(args)
    build_spec(data)  # fail here, with the flag names, before anything is sent
    job = client.submit(data, idempotency_key=args.idempotency_key)
    if args.json:
        _print_json(job)
    else:
        print(job["id"])
        print(f"submitted job {job['id']} ({job['status']}, queue {job['queue']}); follow it with: "
              f"anytime-prune watch {job['id']}", file=sys.stderr)
    if not args.watch:
        return EXIT_OK
    final = _follow(client, job["id"])
    if not args.json:
        _summarise_final(final)
    return _exit_for(final)


def cmd_status(args: argparse.Namespace, client: Client) -> int:
    job = client.status(args.job_id)
    if args.json:
        _print_json(job)
        return EXIT_OK
    p = job.get("progress") or {}
    print(f"job       {job['id']}")
    print(f"status    {job['status']}" + (f" ({job['error']})" if job.get("error") else ""))
    spec = job.get("spec") or {}
    print(f"spec      {spec.get('dataset', {}).get('name')} / {spec.get('architecture')} / {spec.get('method')}, "
          f"{spec.get('stream', {}).get('megabatches')} megabatches x {spec.get('training', {}).get('epochs')} epochs")
    print(f"progress  megabatch {p.get('megabatch')}/{p.get('megabatches')}, epoch {p.get('epoch')}/{p.get('epochs')} "
          f"({100 * float(p.get('fraction') or 0):.0f} %)")
    m = job.get("latest_metrics")
    if m:
        acc, density = m.get("test_accuracy", float("nan")), m.get("density", float("nan"))
        print(f"latest    test accuracy {acc:.4f}, density {density:.4f}")
    print(f"created   {job['created_at']}; finished {job.get('finished_at') or '-'}")
    if job.get("artifacts"):
        print("artifacts " + ", ".join(a["name"] for a in job["artifacts"]))
    return EXIT_OK


def cmd_watch(args: argparse.Namespace, client: Client) -> int:
    final = _follow(client, args.job_id, json_lines=args.json)
    if not args.json:
        _summarise_final(final)
    return _exit_for(final)


def cmd_list(args: argparse.Namespace, client: Client) -> int:
    jobs = client.list(status=args.status, limit=args.limit)
    if args.json:
        _print_json(jobs)
        return EXIT_OK
    if not jobs:
        print("no jobs", file=sys.stderr)
        return EXIT_OK
    print(f"{'id':<32}  {'status':<10} {'created':<24} {'spec':<28} {'progress':>8} {'test acc':>8}")
    for job in jobs:
        spec = job.get("spec") or {}
        what = f"{spec.get('dataset', {}).get('name')}/{spec.get('architecture')}/{spec.get('method')}"
        fraction = float((job.get("progress") or {}).get("fraction") or 0)
        acc = (job.get("latest_metrics") or {}).get("test_accuracy")
        print(f"{job['id']:<32}  {job['status']:<10} {job['created_at']:<24} {what:<28} {100 * fraction:>7.0f}% "
              f"{'-' if acc is None else format(acc, '.4f'):>8}")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace, client: Client) -> int:
    job = client.cancel(args.job_id)
    if args.json:
        _print_json(job)
    else:
        print(f"job {job['id']} is {job['status']}")
    return EXIT_OK


def cmd_download(args: argparse.Namespace, client: Client) -> int:
    paths = client.download(args.job_id, args.out, names=args.name or None)
    for path in paths:
        print(path)
    print(f"downloaded {len(paths)} files into {args.out} (sha256 checked)", file=sys.stderr)
    return EXIT_OK


# --- running the service ------------------------------------------------------------------------


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
    return run_worker(args.queue, settings, loglevel=args.loglevel, hostname=args.hostname)


def _keys_store(args: argparse.Namespace) -> JobStore:
    """The job store holding the API keys: --redis-url, else REDIS_URL, else the Redis of the
    running ``serve`` (from its credentials file)."""
    from anytime_prune.client import read_credentials
    from app_common.settings import Settings
    from app_common.store import JobStore, make_redis

    saved = read_credentials() or {}
    url = args.redis_url or os.environ.get("REDIS_URL") or saved.get("redis_url")
    if not url:
        raise SystemExit("error: no Redis: pass --redis-url, set REDIS_URL, or start `anytime-prune serve`")
    # serve's prefix goes with serve's Redis; otherwise the setting (APP_REDIS_PREFIX or its default).
    same_as_serve = url == saved.get("redis_url") and not os.environ.get("APP_REDIS_PREFIX")
    prefix = args.prefix or (saved.get("redis_prefix") if same_as_serve else None) or Settings().redis_prefix
    return JobStore(make_redis(url, timeout_s=5.0), prefix=prefix)


def cmd_keys(args: argparse.Namespace) -> int:
    import redis

    try:
        store = _keys_store(args)
        if args.keys_command == "create":
            key_id, secret = store.create_key(args.name)
            print(f"key id: {key_id}\nsecret: {secret}")
            print("the secret is shown only once; send it as `Authorization: Bearer <secret>`", file=sys.stderr)
        elif args.keys_command == "revoke":
            if not store.revoke_key(args.key_id):
                print(f"error: no key {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}")
        else:
            keys = store.list_keys()
            if args.json:
                _print_json(keys)
            else:
                for k in keys:
                    print(f"{k['key_id']:<22} {k['created_at']:<26} {k['name']}")
    except redis.exceptions.RedisError as exc:
        print(f"error: Redis: {exc}", file=sys.stderr)
        return EXIT_SERVICE_ERROR
    return 0


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
    """A development API key: the one of the last ``serve`` on this Redis if it still works
    (a persistent REDIS_URL keeps its keys), else a new one."""
    if previous and previous.get("redis_url") == redis_url and previous.get("api_key"):
        owner = store.owner_for_secret(previous["api_key"])
        if owner is not None:
            return owner, str(previous["api_key"])
    key_id, secret = store.create_key("serve development key")
    return key_id, secret


def cmd_serve(args: argparse.Namespace) -> int:
    from anytime_prune.client import credentials_path, read_credentials, write_credentials
    from app_common.redis_server import EmbeddedRedis
    from app_common.settings import Settings
    from app_common.store import JobStore, make_redis

    _quiet_http_logs()
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
        if not os.environ.get("REDIS_URL"):
            embedded = EmbeddedRedis().start()
            os.environ["REDIS_URL"] = embedded.url
        if not os.environ.get("APP_SIGNING_SECRET"):
            os.environ["APP_SIGNING_SECRET"] = secrets.token_urlsafe(32)
        if args.artifacts_dir:
            os.environ["APP_ARTIFACTS_DIR"] = str(Path(args.artifacts_dir).resolve())
        if args.data_dir:
            os.environ["APP_DATA_DIR"] = str(Path(args.data_dir).resolve())
        # The one worker serves --queue, so that is where jobs must go.
        os.environ.setdefault("APP_QUEUES", args.queue)
        os.environ.setdefault("APP_DEFAULT_QUEUE", args.queue)
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
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
        api_argv = ["api", "--host", args.host, "--port", str(args.port), "--log-level", level.lower()]
        group.spawn("api", _self_command(*verbose, *api_argv, *([] if args.verbose else ["--no-access-log"])), env)
        _wait_ready(url, group, args.startup_timeout)

        redis_line = f"embedded, {redis_url}" if embedded else redis_url.split("@")[-1]
        print(f"anytime-prune is serving on {url}  (API docs: {url}/docs)")
        print(f"  redis:     {redis_line}")
        print(f"  worker:    1 process on queue {args.queue}")
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
            print(f"demo: job {job['id']} submitted", flush=True)
            final = _follow(client, job["id"])
            _summarise_final(final)
            if final["status"] != "succeeded":
                return _exit_for(final)
            paths = client.download(job["id"], out)
    except ApiError as exc:
        _report_api_error(exc)
        return EXIT_SERVICE_ERROR
    sparse = next((p for p in paths if p.name == "model.sparse.safetensors"), paths[0])
    print(f"demo: downloaded {len(paths)} files (sha256 checked) into {out.resolve()}")
    print(f"demo: sparse checkpoint {sparse.resolve()}")
    print(f"demo: load it with: python -c \"from app_engine.export import load_model; "
          f"print(load_model('{out}'))\"", flush=True)
    return EXIT_OK


# --- the parser -------------------------------------------------------------------------------


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("service")
    g.add_argument("--url", help="API base URL (default: $ANYTIME_PRUNE_URL, serve's credentials, "
                   f"http://{DEFAULT_HOST}:{DEFAULT_PORT})")
    g.add_argument("--api-key", help="API key (default: $ANYTIME_PRUNE_API_KEY, else serve's credentials)")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request")
    g.add_argument("--json", action="store_true", help="machine-readable output")


def _client_parser(sub: Any, name: str, fn: Callable[[argparse.Namespace, Client], int], help_text: str,
                   job_id: bool = True) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text, epilog=EXIT_CODES_HELP)
    if job_id:
        p.add_argument("job_id")
    _add_client_flags(p)
    p.set_defaults(func=_client_command(fn))
    return p


def add_service_commands(sub: Any) -> None:
    """Add the service sub-commands to the ``anytime-prune`` parser's subparsers."""
    s = sub.add_parser(
        "serve",
        help="all in one: Redis, one worker and the API on this machine",
        description="Start Redis (embedded unless REDIS_URL is set), one worker and the API; write a "
        "development API key for the CLI client; Ctrl-C stops everything.",
    )
    s.add_argument("--host", default=DEFAULT_HOST)
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--artifacts-dir", help="where jobs write their files (default: $APP_ARTIFACTS_DIR)")
    s.add_argument("--data-dir", help="root of dataset paths in job specs (default: $APP_DATA_DIR)")
    s.add_argument("--queue", choices=QUEUES, default="cpu", help="the queue of the worker")
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
    w.add_argument("--queue", choices=QUEUES, required=True, help="the Celery queue to consume (one job at a time)")
    w.add_argument("--loglevel", default="INFO", type=str.upper)
    w.add_argument("--hostname", help="Celery node name (default: <queue>@<host>)")
    w.set_defaults(func=cmd_worker)

    k = sub.add_parser("keys", help="create, list or revoke API keys (in Redis)")
    k.add_argument("--redis-url", help="default: $REDIS_URL, else the Redis of the running serve")
    k.add_argument("--prefix", help="Redis key prefix (default: $APP_REDIS_PREFIX or 'app')")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = ksub.add_parser("create", help="a new key; prints its secret once")
    kc.add_argument("name", help="what the key is for, e.g. 'ci pipeline'")
    kr = ksub.add_parser("revoke", help="revoke a key by its id")
    kr.add_argument("key_id")
    kl = ksub.add_parser("list", help="the keys (ids and names, never secrets)")
    kl.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_keys)

    p = _client_parser(sub, "submit", cmd_submit, "submit a job (spec file and/or flags); prints its id",
                       job_id=False)
    add_spec_flags(p)
    p.add_argument("--idempotency-key", help="retrying with the same key returns the same job")
    p.add_argument("--watch", action="store_true", help="follow the job until it ends; exit status = its outcome")
    _client_parser(sub, "status", cmd_status, "show a job")
    _client_parser(sub, "watch", cmd_watch, "follow a job's events live until it ends")
    ls = _client_parser(sub, "list", cmd_list, "list your jobs, newest first", job_id=False)
    ls.add_argument("--status", choices=("queued", "running", "cancelling", "succeeded", "failed", "cancelled"))
    ls.add_argument("--limit", type=int, default=20)
    _client_parser(sub, "cancel", cmd_cancel, "cancel a job")
    d = _client_parser(sub, "download", cmd_download, "download a finished job's files (sha256 checked)")
    d.add_argument("--out", required=True, help="folder to write into")
    d.add_argument("--name", action="append", help="only this file (repeatable)")

