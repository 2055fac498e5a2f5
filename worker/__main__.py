"""``python -m worker --queue cpu``: a worker with settings from the environment."""

from __future__ import annotations

import argparse
import sys

from app_common.settings import Settings
from worker.cli import WORKER_QUEUES, run_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description="Run an anytime-prune worker.")
    parser.add_argument("--queue", choices=WORKER_QUEUES, default="cpu", help="Celery queue to consume")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--hostname", default=None, help="Celery node name (default: <queue>@<host>)")
    args = parser.parse_args(argv)
    return run_worker(args.queue, Settings(), loglevel=args.loglevel, hostname=args.hostname)


if __name__ == "__main__":
    sys.exit(main())
