"""The Celery task: a thin adapter from a message to :func:`worker.job.execute_job`.

The API sends ``anytime_prune.run_job`` by name with one argument, the job id; everything else
(the spec, the status, progress) lives in the job record in Redis.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery import Celery, Task

from app_common.settings import Settings
from app_common.store import JobStore, make_redis
from app_common.tasks import RUN_JOB_TASK, VALIDATE_DATASET_TASK
from worker.datasets import validate_dataset
from worker.job import execute_job

log = logging.getLogger(__name__)

# Exit status of a pool child ended after the cancel grace period (EX_SOFTWARE-like, non-zero so
# Celery's log shows it was not a normal exit).
TERMINATED_EXIT_CODE = 70


def connect_store(settings: Settings) -> JobStore:
    """A job store on ``settings.redis_url`` with the service's prefix, limits and timeouts."""
    if settings.redis_url is None:
        raise RuntimeError("a worker needs REDIS_URL (the broker and the job store)")
    client = make_redis(settings.redis_url, timeout_s=settings.redis_timeout_s)
    return JobStore(client, prefix=settings.redis_prefix, events_maxlen=settings.events_maxlen)


def terminate_process() -> None:
    """End this pool child at once (called from the heartbeat thread after the grace period).

    The job is already marked cancelled. The parent sees the child die, and with
    ``reject_on_worker_lost`` puts the message back; the redelivery finds the job terminal and is
    acknowledged without running anything. ``os._exit`` because a run cannot be interrupted from
    another thread; nothing else of value is lost (the last megabatch checkpoint is in the store).
    """
    logging.shutdown()
    sys.stderr.flush()
    os._exit(TERMINATED_EXIT_CODE)


# Options of both tasks: acknowledged after the work (a lost worker's message comes back), results
# ignored (the job or dataset record in Redis is the outcome), retried with backoff on errors.
DURABLE_TASK: dict[str, Any] = {
    "bind": True,
    # Not a "shared" task: Celery would otherwise add the closure (and its settings) to every app
    # created later in the process.
    "shared": False,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "ignore_result": True,
    "autoretry_for": (Exception,),
    "retry_backoff": 5,
    "retry_backoff_max": 300,
    "retry_jitter": True,
    "max_retries": 10,
}


def register_tasks(app: Celery, settings: Settings) -> None:
    """Register ``anytime_prune.run_job`` and ``anytime_prune.validate_dataset`` (the control
    queue's) on ``app``, bound to ``settings``.

    The task is a closure over ``settings`` (not a module-level ``shared_task``) so a worker
    started programmatically with injected settings runs jobs with those, not with whatever the
    environment says; pool children are forked and inherit them.
    """

    # Redis unreachable, or a run that raised something other than a user error: retry later; the
    # job resumes from its checkpoint. execute_job records user errors on the job itself and fails
    # it once the attempt cap is reached, so retries are bounded; validate_dataset records every
    # problem of an upload on the dataset (which stays validating while the store is away).
    @app.task(name=RUN_JOB_TASK, **DURABLE_TASK)  # type: ignore[untyped-decorator]  # Celery is untyped
    def run_job(self: Task, job_id: str) -> str:
        log.info("job %s: delivery %s (redelivered: %s)", job_id, self.request.id, _redelivered(self))
        store = connect_store(settings)
        # Built per delivery, in the pool child: boto3 clients are not to be shared across a fork.
        storage = settings.open_storage()
        outcome = execute_job(
            job_id, store=store, settings=settings, storage=storage, on_cancel_timeout=terminate_process
        )
        log.info("job %s: %s", job_id, outcome)
        return outcome

    @app.task(name=VALIDATE_DATASET_TASK, **DURABLE_TASK)  # type: ignore[untyped-decorator]
    def validate(self: Task, dataset_id: str) -> str:
        log.info("dataset %s: validation %s", dataset_id, self.request.id)
        outcome = validate_dataset(
            dataset_id, store=connect_store(settings), storage=settings.open_storage(), settings=settings
        )
        log.info("dataset %s: %s", dataset_id, outcome)
        return outcome


def _redelivered(task: Task) -> Any:
    info = task.request.delivery_info or {}
    return info.get("redelivered")
