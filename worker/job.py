"""Run one job: the work behind the Celery task, testable without Celery.

:func:`execute_job` is the whole life of one delivery of a job:

1. load the record; a missing or terminal job is skipped (a late redelivery);
2. take the lease, or stand down when another worker keeps it alive (a duplicate delivery);
3. count the attempt; past ``max_attempts`` the job fails instead of crashing workers forever;
4. mark it running and start the heartbeat;
5. run the engine into ``{artifacts_dir}/{job_id}`` (which resumes from the last megabatch
   checkpoint when an earlier attempt left one), streaming events through the sink;
6. record the outcome (succeeded with result and artifacts, cancelled, or failed with a reason)
   and release the lease.

The return value says what happened to this delivery (one of the ``OUTCOME_*`` names or a
terminal status); the job record in Redis is the source of truth, not Celery's task state.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from app_common.events import CANCELLED, CANCELLING, FAILED, QUEUED, RUNNING, SUCCEEDED, TERMINAL_STATUSES
from app_common.settings import Settings
from app_common.spec import JobSpec
from app_common.store import JobStore
from worker.lease import LeaseHeartbeat, acquire_lease

log = logging.getLogger(__name__)

RUN_JOB_TASK = "anytime_prune.run_job"

OUTCOME_SKIPPED = "skipped"  # missing, or already terminal: nothing to do
OUTCOME_DUPLICATE = "duplicate"  # another worker holds a live lease on the job
OUTCOME_LEASE_LOST = "lease_lost"  # another worker took the job over while this one ran it

ACTIVE_STATUSES = frozenset({QUEUED, RUNNING, CANCELLING})


def job_out_dir(settings: Settings, job_id: str) -> Path:
    """The engine's ``out_dir`` for a job: checkpoints, ``result.json`` and exported files."""
    return Path(settings.artifacts_dir) / job_id


def check_dataset_path(spec: JobSpec, data_dir: Path) -> None:
    """Refuse a ``dataset.path`` that points outside the server's data folder.

    Relative paths are resolved under ``data_dir`` (by the engine, through ``data_root``);
    ``..`` tricks and absolute paths elsewhere would let a client make the server read any file.
    The check is lexical: symlinks an operator put inside the data folder (to a mounted dataset
    volume, say) are followed, clients cannot create any.
    """
    path = spec.dataset.path
    if path is None:
        return
    root = Path(os.path.normpath(Path(data_dir).absolute()))
    target = Path(os.path.normpath(root / path))
    if not target.is_relative_to(root):
        raise ValueError(f"dataset.path '{path}' is outside the server's data folder")


def execute_job(
    job_id: str,
    *,
    store: JobStore,
    settings: Settings,
    on_cancel_timeout: Callable[[], None] | None = None,
    lease_wait_s: float | None = None,
) -> str:
    """Run one delivery of job ``job_id`` and return what became of it.

    ``on_cancel_timeout`` is called (from the heartbeat thread) after a job that ignored its
    cancel flag for the grace period was marked cancelled; the Celery task ends its process
    there. ``lease_wait_s`` (default: one lease TTL and a second) is how long to wait for a lease
    held by someone else to expire before standing down.
    """
    record = store.get_job(job_id)
    if record is None:
        log.warning("job %s: no such job; nothing to run", job_id)
        return OUTCOME_SKIPPED
    if record["status"] in TERMINAL_STATUSES:
        log.info("job %s: already %s; nothing to run", job_id, record["status"])
        return OUTCOME_SKIPPED

    ttl = float(settings.job_lease_ttl_s)
    token = uuid.uuid4().hex
    wait = ttl + 1.0 if lease_wait_s is None else lease_wait_s
    if not acquire_lease(store, job_id, token, ttl, wait_s=wait):
        log.info("job %s: another worker holds its lease; standing down", job_id)
        return OUTCOME_DUPLICATE
    try:
        return _execute_leased(job_id, token, store=store, settings=settings, on_cancel_timeout=on_cancel_timeout)
    finally:
        try:
            store.release_lease(job_id, token)
        except RedisError as exc:  # it expires on its own within one TTL
            log.warning("job %s: could not release the lease (%s)", job_id, exc)


def _execute_leased(
    job_id: str,
    token: str,
    *,
    store: JobStore,
    settings: Settings,
    on_cancel_timeout: Callable[[], None] | None,
) -> str:
    # Read again: the job may have changed while we waited for the lease.
    record = store.get_job(job_id)
    if record is None or record["status"] in TERMINAL_STATUSES:
        return OUTCOME_SKIPPED
    if record.get("cancel_requested"):
        # Cancelled while queued, or while a worker that has since died was running it: there is
        # nothing to resume for a cancelled job.
        why = "cancelled before it ran" if record["status"] == QUEUED else "cancelled by request"
        store.transition(job_id, CANCELLED, reason=why, allowed_from=ACTIVE_STATUSES)
        return _status(store, job_id)

    attempt = store.next_attempt(job_id)
    if attempt > settings.max_attempts:
        why = f"worker died {attempt - 1} times; giving up"
        store.transition(job_id, FAILED, reason=why, allowed_from=ACTIVE_STATUSES)
        log.error("job %s: %s", job_id, why)
        return _status(store, job_id)

    resumed = None if attempt == 1 else f"attempt {attempt}: resuming after a lost worker"
    if not store.transition(job_id, RUNNING, reason=resumed, allowed_from={QUEUED, RUNNING}):
        # Cancelled (or failed by someone) between our read and now.
        current = store.get_job(job_id)
        if current is not None and current["status"] == CANCELLING:
            store.transition(job_id, CANCELLED, reason="cancelled before it ran", allowed_from={CANCELLING})
        return _status(store, job_id)

    heartbeat = LeaseHeartbeat(
        store,
        job_id,
        token,
        float(settings.job_lease_ttl_s),
        cancel_grace_s=settings.cancel_grace_s,
        on_cancel_timeout=on_cancel_timeout,
    )
    heartbeat.start()
    try:
        return _run_engine(job_id, record["spec"], store=store, settings=settings, heartbeat=heartbeat)
    finally:
        heartbeat.stop()


def _run_engine(
    job_id: str, spec_dict: dict[str, Any], *, store: JobStore, settings: Settings, heartbeat: LeaseHeartbeat
) -> str:
    # The engine imports torch: only here, in the process that runs the job (the pool child).
    from app_engine.runner import run
    from worker.sink import RedisProgressSink

    sink = RedisProgressSink(store, job_id, interrupt=heartbeat.interrupt_reason)
    try:
        spec = JobSpec.from_dict(spec_dict)
        check_dataset_path(spec, Path(settings.data_dir))
        outcome = run(
            spec, job_out_dir(settings, job_id), callbacks=[sink], data_root=Path(settings.data_dir)
        )
    except RedisError:
        # Not the job's fault: let the task retry; a redelivery resumes from the checkpoint.
        raise
    except ValueError as exc:
        # Bad spec, unreadable dataset (DatasetError), a config the engine refuses: the user's
        # to fix, so fail at once without retrying.
        if heartbeat.lease_lost:
            return OUTCOME_LEASE_LOST
        log.info("job %s: failed: %s", job_id, exc)
        return _finish(store, job_id, FAILED, str(exc))
    except Exception as exc:
        if heartbeat.lease_lost:
            return OUTCOME_LEASE_LOST
        log.exception("job %s: the run raised", job_id)
        return _finish(store, job_id, FAILED, f"{type(exc).__name__}: {exc}")

    if heartbeat.lease_lost:
        log.warning("job %s: lost the lease; leaving the job to its new worker", job_id)
        return OUTCOME_LEASE_LOST
    if heartbeat.cancel_forced:
        return _status(store, job_id)
    if outcome.stopped:
        if sink.cancel_seen:
            return _finish(store, job_id, CANCELLED, "cancelled by request")
        return _finish(store, job_id, FAILED, f"run stopped: {outcome.stop_reason}")

    current = store.get_job(job_id)
    if current is None or current["status"] in TERMINAL_STATUSES:
        return _status(store, job_id)
    artifacts = [
        {"name": name, "format": a["format"], "bytes": a["bytes"], "sha256": a["sha256"]}
        for name, a in outcome.artifacts.items()
    ]
    store.set_result(job_id, outcome.result, artifacts)
    # A cancel that arrived after the last epoch finds the work done: it still succeeds.
    late_cancel = "finished before the cancel took effect" if current["status"] == CANCELLING else None
    return _finish(store, job_id, SUCCEEDED, late_cancel)


def _finish(store: JobStore, job_id: str, status: str, reason: str | None) -> str:
    if not store.transition(job_id, status, reason=reason, allowed_from={RUNNING, CANCELLING}):
        log.warning("job %s: could not mark it %s; it is %s", job_id, status, _status(store, job_id))
    return _status(store, job_id)


def _status(store: JobStore, job_id: str) -> str:
    record = store.get_job(job_id)
    return OUTCOME_SKIPPED if record is None else str(record["status"])
