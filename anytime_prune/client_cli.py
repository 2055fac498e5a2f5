"""The client verbs of ``anytime-prune``: ``submit``, ``status``, ``watch``, ``list``, ``cancel``,
``download`` and ``datasets`` (``upload``, ``list``, ``show``, ``delete``), which talk to a running
service over HTTP.

They need httpx only (imported per command): never torch, fastapi or celery.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anytime_prune.engine_cli import ConsoleProgress, add_spec_flags, build_spec, megabatch_table, spec_dict_from_args
from app_common.datasets import DATASET_FORMATS, DATASET_STATUSES
from app_common.events import (
    EVENT_TYPES,
    STATUSES,
    MegabatchMetrics,
    RunStarted,
    StatusChanged,
    WarningIssued,
    event_from_dict,
)

if TYPE_CHECKING:
    from anytime_prune.client import ApiError, Client, JobEvent

log = logging.getLogger("anytime_prune")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000

# Exit statuses of the client verbs (``watch`` and ``submit --watch`` report the job's outcome).
EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_JOB_CANCELLED = 3
EXIT_SERVICE_ERROR = 4
EXIT_CODES_HELP = (
    "exit status: 0 the job succeeded (or the command worked), 1 the job failed, 2 bad usage, "
    "3 the job was cancelled, 4 the service answered with an error or could not be reached"
)
DATASET_EXIT_CODES_HELP = (
    "exit status: 0 it worked, 1 validation refused the dataset (the reason is printed), 2 bad usage, "
    "4 the service answered with an error or could not be reached"
)


def quiet_http_logs() -> None:
    # httpx logs every request at INFO: noise on a console that shows a job's progress.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _client(args: argparse.Namespace) -> Client:
    """The client from --url / --api-key, else the environment, else serve's credentials file."""
    from anytime_prune.client import Client

    quiet_http_logs()
    env = dict(os.environ)
    if args.url:
        env["ANYTIME_PRUNE_URL"] = args.url
    if args.api_key:
        env["ANYTIME_PRUNE_API_KEY"] = args.api_key
    return Client.from_env(environ=env, timeout=args.timeout)


def _client_command(fn: Callable[[argparse.Namespace, Client], int]) -> Callable[[argparse.Namespace], int]:
    """Run ``fn`` with a client; an API error becomes a message and exit status 4 (a dataset
    that validation refused: its reason and exit status 1)."""

    def run(args: argparse.Namespace) -> int:
        from anytime_prune.client import ApiError, DatasetInvalid

        try:
            client = _client(args)
        except ValueError as exc:  # an unreadable credentials file
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_SERVICE_ERROR
        try:
            with client:
                return fn(args, client)
        except DatasetInvalid as exc:
            print(f"error: dataset {exc.dataset.get('id')} is invalid: {exc.reason}", file=sys.stderr)
            return EXIT_JOB_FAILED
        except ApiError as exc:
            report_api_error(exc)
            return EXIT_SERVICE_ERROR
        except KeyboardInterrupt:
            if getattr(args, "datasets_command", None) == "upload":
                print("\ninterrupted (an upload cut short is deleted; one fully sent is still validated: "
                      "`anytime-prune datasets list`)", file=sys.stderr)
            else:  # Ctrl-C while watching: the job itself keeps running
                print("\ninterrupted (the job is not cancelled; `anytime-prune cancel` does that)", file=sys.stderr)
            return 130

    return run


def report_api_error(exc: ApiError) -> None:
    print(f"error: {exc}", file=sys.stderr)
    if exc.status == 401:
        print("hint: pass --api-key, set ANYTIME_PRUNE_API_KEY, or start `anytime-prune serve`, which "
              "writes a development key for this client", file=sys.stderr)
    elif exc.status == 0:
        print("hint: is the service running? (`anytime-prune serve`, or pass --url)", file=sys.stderr)


def print_json(value: Any) -> None:
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
        if event.type not in EVENT_TYPES:
            return
        try:
            # The SSE event name is the type; the data carries the fields.
            typed = event_from_dict({**event.data, "type": event.type})
        except (TypeError, ValueError):
            log.debug("unreadable event %s: %s", event.type, event.data)
            return
        if isinstance(typed, WarningIssued):
            self.say(f"{self.label}warning ({typed.source}): {typed.message}", logging.WARNING)
            return
        if isinstance(typed, StatusChanged):
            self.say(f"{self.label}status: {typed.status}" + (f" ({typed.reason})" if typed.reason else ""))
            if event.terminal_status:
                self.close()
            return
        if isinstance(typed, RunStarted):
            # A resumed job starts again: a fresh bar continues from the megabatches already done.
            self.close()
            self.console = ConsoleProgress(self.label)
        if self.console is not None:
            self.console(typed)

    def say(self, line: str, level: int = logging.INFO) -> None:
        """A line above the progress bar, or a log line when there is none."""
        if self.console is not None and self.console.bar is not None:
            self.console.bar.write(line)
        else:
            log.log(level, "%s", line)

    def close(self) -> None:
        if self.console is not None and self.console.bar is not None:
            self.console.bar.close()
            self.console.bar = None


def exit_for(job: dict[str, Any]) -> int:
    return {"succeeded": EXIT_OK, "cancelled": EXIT_JOB_CANCELLED}.get(job["status"], EXIT_JOB_FAILED)


def summarise_final(job: dict[str, Any]) -> None:
    """What a person wants to see when a job ends: the per-megabatch table, or why it did not
    succeed."""
    if job["status"] == "succeeded" and job.get("result"):
        print(megabatch_table(job["result"]))
    elif job["status"] != "succeeded":
        print(f"job {job['id']} {job['status']}" + (f": {job['error']}" if job.get("error") else ""),
              file=sys.stderr)


def follow(client: Client, job_id: str, *, json_lines: bool = False) -> dict[str, Any]:
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
        print_json(job)
    else:
        print(job["id"])
        print(f"submitted job {job['id']} ({job['status']}, queue {job['queue']}); follow it with: "
              f"anytime-prune watch {job['id']}", file=sys.stderr)
    if not args.watch:
        return EXIT_OK
    final = follow(client, job["id"])
    if not args.json:
        summarise_final(final)
    return exit_for(final)


def latest_metrics(job: dict[str, Any]) -> MegabatchMetrics | None:
    """The job's last per-megabatch metrics, or None before the first megabatch ends (or when a
    record written by another version lacks a field)."""
    raw = job.get("latest_metrics")
    if not isinstance(raw, dict):
        return None
    try:
        return MegabatchMetrics.from_dict(raw)
    except TypeError:
        log.debug("unreadable latest_metrics of job %s: %s", job.get("id"), raw)
        return None


def cmd_status(args: argparse.Namespace, client: Client) -> int:
    job = client.status(args.job_id)
    if args.json:
        print_json(job)
        return EXIT_OK
    p = job.get("progress") or {}
    print(f"job       {job['id']}")
    print(f"status    {job['status']}" + (f" ({job['error']})" if job.get("error") else ""))
    spec = job.get("spec") or {}
    dataset = spec.get("dataset") or {}
    what = f"{dataset.get('name')}" + (f" (uploaded dataset {dataset['id']})" if dataset.get("id") else "")
    print(f"spec      {what} / {spec.get('architecture')} / {spec.get('method')}, "
          f"{spec.get('stream', {}).get('megabatches')} megabatches x {spec.get('training', {}).get('epochs')} epochs")
    print(f"progress  megabatch {p.get('megabatch')}/{p.get('megabatches')}, epoch {p.get('epoch')}/{p.get('epochs')} "
          f"({100 * float(p.get('fraction') or 0):.0f} %)")
    m = latest_metrics(job)
    if m is not None:
        print(f"latest    test accuracy {m.test_accuracy:.4f}, density {m.density:.4f}")
    print(f"created   {job['created_at']}; finished {job.get('finished_at') or '-'}")
    if job.get("artifacts"):
        print("artifacts " + ", ".join(a["name"] for a in job["artifacts"]))
    return EXIT_OK


def cmd_watch(args: argparse.Namespace, client: Client) -> int:
    final = follow(client, args.job_id, json_lines=args.json)
    if not args.json:
        summarise_final(final)
    return exit_for(final)


def cmd_list(args: argparse.Namespace, client: Client) -> int:
    jobs = client.list(status=args.status, limit=args.limit)
    if args.json:
        print_json(jobs)
        return EXIT_OK
    if not jobs:
        print("no jobs", file=sys.stderr)
        return EXIT_OK
    rows = [("id", "status", "created (UTC)", "spec", "progress", "test acc")]
    for job in jobs:
        spec = job.get("spec") or {}
        what = f"{spec.get('dataset', {}).get('name')}/{spec.get('architecture')}/{spec.get('method')}"
        fraction = float((job.get("progress") or {}).get("fraction") or 0)
        m = latest_metrics(job)
        rows.append((job["id"], job["status"], short_time(job["created_at"]), what, f"{100 * fraction:.0f}%",
                     "-" if m is None else format(m.test_accuracy, ".4f")))
    print_table(rows, right=(4, 5))
    return EXIT_OK


def short_time(iso: str) -> str:
    """``2026-11-30T23:33:01.123Z`` -> ``2026-11-30 23:33:01`` (a table column, to the second)."""
    return iso.replace("T", " ")[:19]


def print_table(rows: Sequence[Sequence[str]], *, right: tuple[int, ...] = ()) -> None:
    """Rows as columns as wide as their widest cell, two spaces apart (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())


def cmd_cancel(args: argparse.Namespace, client: Client) -> int:
    job = client.cancel(args.job_id)
    if args.json:
        print_json(job)
    else:
        print(f"job {job['id']} is {job['status']}")
    return EXIT_OK


def cmd_download(args: argparse.Namespace, client: Client) -> int:
    bounded = args.max_density is not None or args.min_accuracy is not None
    chosen = [flag for flag, given in (("--name", bool(args.name)), ("--megabatch", args.megabatch is not None),
                                      ("--best", args.best)) if given]
    problem = None
    if len(chosen) > 1:
        problem = f"{' and '.join(chosen)} choose different files: give one"
    elif args.best and not bounded:
        problem = "--best needs --max-density, --min-accuracy or both"
    elif bounded and not args.best:
        problem = "--max-density and --min-accuracy choose a model with --best"
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.megabatch is not None or args.best:
        paths = client.download_model(args.job_id, args.out, megabatch=args.megabatch,
                                      max_density=args.max_density, min_accuracy=args.min_accuracy)
    else:
        paths = client.download(args.job_id, args.out, names=args.name or None)
    for path in paths:
        print(path)
    print(f"downloaded {len(paths)} files into {args.out} (sha256 checked)", file=sys.stderr)
    return EXIT_OK


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text}")
    return value


def _megabatch(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a megabatch number (1, 2, ...), got {text!r}")
    return value


# --- datasets ---------------------------------------------------------------------------------


class UploadProgress:
    """A byte progress bar on a terminal (stderr); nothing otherwise, so logs and pipes stay clean."""

    def __init__(self, label: str, stream: Any = None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar: Any = None

    def __call__(self, sent: int, total: int) -> None:
        if not self.tty:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.label, unit="B", unit_scale=True, unit_divisor=1024,
                            file=self.stream, leave=False)
        self.bar.update(sent - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def describe_dataset(record: dict[str, Any]) -> str:
    """One line: what validation found, or why the dataset is not usable."""
    info = record.get("info")
    if record["status"] == "ready" and isinstance(info, dict):
        shape = "x".join(str(d) for d in info.get("input_shape") or [])
        return (f"{info.get('train_samples')} train / {info.get('test_samples')} test samples, "
                f"{info.get('num_classes')} classes, input {shape}")
    if record["status"] == "invalid":
        return f"invalid: {record.get('error') or 'no reason given'}"
    return str(record["status"])


def cmd_datasets_upload(args: argparse.Namespace, client: Client) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"error: {path}: no such file", file=sys.stderr)
        return EXIT_USAGE
    progress = UploadProgress(path.name)
    try:
        record = client.upload_dataset(path, args.format, args.name, progress=progress, wait=not args.no_wait,
                                       timeout_s=args.wait_timeout)
    except TimeoutError as exc:
        print(f"error: {exc}; follow it with `anytime-prune datasets show ID`", file=sys.stderr)
        return EXIT_SERVICE_ERROR
    finally:
        progress.close()
    if args.json:
        print_json(record)
    else:
        print(record["id"])
        print(f"dataset {record['id']} ({record['format']}, {path.name}): {describe_dataset(record)}", file=sys.stderr)
        if record["status"] == "ready":
            print(f"train on it with: anytime-prune submit --dataset-id {record['id']} ...", file=sys.stderr)
    return EXIT_OK


def cmd_datasets_list(args: argparse.Namespace, client: Client) -> int:
    datasets = client.list_datasets(status=args.status, limit=args.limit)
    if args.json:
        print_json(datasets)
        return EXIT_OK
    if not datasets:
        print("no datasets", file=sys.stderr)
        return EXIT_OK
    rows = [("id", "status", "format", "bytes", "created (UTC)", "name")]
    rows += [(d["id"], d["status"], d["format"], str(d["bytes"]), short_time(d["created_at"]), d["name"])
             for d in datasets]
    print_table(rows, right=(3,))
    return EXIT_OK


def cmd_datasets_show(args: argparse.Namespace, client: Client) -> int:
    record = client.get_dataset(args.dataset_id)
    if args.json:
        print_json(record)
        return EXIT_OK
    print(f"dataset   {record['id']}")
    print(f"name      {record['name']}")
    print(f"format    {record['format']}, {record['bytes']} bytes, sha256 {record['sha256']}")
    print(f"status    {describe_dataset(record)}")
    info = record.get("info")
    if isinstance(info, dict) and info.get("classes"):
        print("classes   " + ", ".join(str(c) for c in info["classes"]))
    print(f"created   {record['created_at']}; updated {record.get('updated_at') or '-'}")
    return EXIT_OK


def cmd_datasets_delete(args: argparse.Namespace, client: Client) -> int:
    client.delete_dataset(args.dataset_id)
    print(f"dataset {args.dataset_id} deleted")
    return EXIT_OK


def add_datasets_command(sub: Any) -> None:
    help_text = "upload your own data, list, show and delete your datasets"
    p: argparse.ArgumentParser = sub.add_parser("datasets", help=help_text, description=help_text)
    actions = p.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")
    up = _client_parser(actions, "upload", cmd_datasets_upload, "upload a dataset file, wait until it is "
                        "validated and print its id", job_id=False, epilog=DATASET_EXIT_CODES_HELP)
    up.add_argument("file", help="an .npz file, or a .zip / .tar.gz of a cifar python folder or an image folder")
    up.add_argument("--format", required=True, choices=DATASET_FORMATS, help="the loader that reads it")
    up.add_argument("--name", help="a label for people (default: the file's name)")
    up.add_argument("--no-wait", action="store_true",
                    help="print the id once the bytes are in, without waiting for validation")
    up.add_argument("--wait-timeout", type=float, default=1800.0, help="seconds to wait for validation")
    ls = _client_parser(actions, "list", cmd_datasets_list, "list your datasets, newest first", job_id=False,
                        epilog=DATASET_EXIT_CODES_HELP)
    ls.add_argument("--status", choices=DATASET_STATUSES)
    ls.add_argument("--limit", type=int, default=50)
    for name, fn, text in (("show", cmd_datasets_show, "show a dataset (what validation found)"),
                           ("delete", cmd_datasets_delete, "delete a dataset and its stored bytes")):
        action = _client_parser(actions, name, fn, text, job_id=False, epilog=DATASET_EXIT_CODES_HELP)
        action.add_argument("dataset_id")


# --- the parser -------------------------------------------------------------------------------


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("service")
    g.add_argument("--url", help="API base URL (default: $ANYTIME_PRUNE_URL, serve's credentials, "
                   f"http://{DEFAULT_HOST}:{DEFAULT_PORT})")
    g.add_argument("--api-key", help="API key (default: $ANYTIME_PRUNE_API_KEY, else serve's credentials)")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request")
    g.add_argument("--json", action="store_true", help="machine-readable output")


def _client_parser(sub: Any, name: str, fn: Callable[[argparse.Namespace, Client], int], help_text: str,
                   job_id: bool = True, epilog: str = EXIT_CODES_HELP) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog)
    if job_id:
        p.add_argument("job_id")
    _add_client_flags(p)
    p.set_defaults(func=_client_command(fn))
    return p


def add_client_commands(sub: Any) -> None:
    """Add the client verbs to the ``anytime-prune`` parser's subparsers."""
    p = _client_parser(sub, "submit", cmd_submit, "submit a job (spec file and/or flags); prints its id",
                       job_id=False)
    add_spec_flags(p)
    p.add_argument("--idempotency-key", help="retrying with the same key returns the same job")
    p.add_argument("--watch", action="store_true", help="follow the job until it ends; exit status = its outcome")
    _client_parser(sub, "status", cmd_status, "show a job")
    _client_parser(sub, "watch", cmd_watch, "follow a job's events live until it ends")
    ls = _client_parser(sub, "list", cmd_list, "list your jobs, newest first", job_id=False)
    ls.add_argument("--status", choices=STATUSES)
    ls.add_argument("--limit", type=int, default=20)
    _client_parser(sub, "cancel", cmd_cancel, "cancel a job")
    d = _client_parser(sub, "download", cmd_download, "download a finished job's files, or a model kept after "
                       "one of its megabatches (sha256 checked)")
    d.add_argument("--out", required=True, help="folder to write into")
    d.add_argument("--name", action="append", help="only this file (repeatable)")
    d.add_argument("--megabatch", type=_megabatch, metavar="N",
                   help="the model kept after megabatch N, with its manifest, into OUT/megabatch-000N/ "
                   "(a running job's too)")
    d.add_argument("--best", action="store_true",
                   help="the kept model that suits --max-density and/or --min-accuracy, into OUT/megabatch-000N/")
    d.add_argument("--max-density", type=_fraction, metavar="D",
                   help="with --best: the most accurate model with at most this density")
    d.add_argument("--min-accuracy", type=_fraction, metavar="A",
                   help="with --best: the sparsest model with at least this test accuracy")
    add_datasets_command(sub)

