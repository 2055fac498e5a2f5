"""Start a worker programmatically (``anytime-prune worker --queue gpu|cpu|control`` calls this)."""

from __future__ import annotations

import logging
import os

from app_common.settings import Settings
from app_common.tasks import CONTROL_QUEUE, QUEUE_NAMES

log = logging.getLogger(__name__)

# What ``--queue`` accepts: a training queue, or the control queue (dataset validation).
WORKER_QUEUES: tuple[str, ...] = (*QUEUE_NAMES, CONTROL_QUEUE)


def worker_argv(queue: str, *, loglevel: str = "INFO", hostname: str | None = None) -> list[str]:
    """The ``celery worker`` arguments of one job-at-a-time worker on ``queue``.

    Equivalent to ``celery -A worker.celery_app worker -Q <queue> -c 1 --prefetch-multiplier 1
    -O fair --max-tasks-per-child 1``: one job per worker (one per GPU), holding no message it
    does not run, and a fresh pool child for every job.
    """
    if queue not in WORKER_QUEUES:
        raise ValueError(f"unknown queue '{queue}'; known: {', '.join(WORKER_QUEUES)}")
    return [
        "worker",
        "--queues", queue,
        "--concurrency", "1",
        "--prefetch-multiplier", "1",
        "--optimization", "fair",
        "--max-tasks-per-child", "1",
        "--pool", "prefork",
        "--loglevel", loglevel,
        "--hostname", hostname or f"{queue}@%h",
        # Gossip and mingle exchange state between workers at startup and every second; our
        # workers share nothing through Celery, and without them startup is faster.
        "--without-gossip",
        "--without-mingle",
    ]


def share_the_machine(settings: Settings) -> None:
    """Apply the worker's CPU share before Celery forks its pool: a lower priority (``nice``) and a
    bound on the threads torch starts in the job's process (it reads OMP_NUM_THREADS at import,
    which happens in the pool child, after this)."""
    if settings.worker_nice:
        os.nice(settings.worker_nice)
    if settings.torch_threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(settings.torch_threads)


def run_worker(queue: str, settings: Settings, *, loglevel: str = "INFO", hostname: str | None = None) -> int:
    """Run a worker consuming ``queue`` until it is shut down; returns its exit status."""
    if settings.redis_url is None:
        raise RuntimeError("a worker needs REDIS_URL (the broker and the job store)")
    if queue in QUEUE_NAMES and queue not in settings.queues:
        log.warning(
            "this worker consumes queue %r, but the API sends jobs only to APP_QUEUES=%s: no job will come here "
            "unless the API runs with APP_QUEUES including %r", queue, ",".join(settings.queues), queue
        )
    share_the_machine(settings)
    from worker.celery_app import make_celery

    app = make_celery(settings)
    log.info("starting a worker on queue %s", queue)
    code = app.start(argv=worker_argv(queue, loglevel=loglevel, hostname=hostname))
    return int(code or 0)
