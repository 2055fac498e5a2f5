"""Run one job: the work behind the Celery task, testable without Celery.

:func:`execute_job` is the whole life of one delivery of a job:

1. take the lease, or stand down when another worker keeps it alive (a duplicate delivery);
2. read the record (once); a missing or terminal job is skipped (a late redelivery);
3. count the attempt; past ``max_attempts`` the job fails instead of crashing workers forever;
4. mark it running and start the heartbeat;
5. check the spec and its dataset path, fetch the job's checkpoints from the object store into
   an empty ``{artifacts_dir}/{job_id}``, then run the engine there (it resumes from the last
   megabatch checkpoint an earlier attempt, on any host, left), streaming events through the
   sink and uploading each checkpoint as it is written (:mod:`worker.files`); a completed run's
   exported files are uploaded to the store;
6. record the outcome, drop the work folder (locally and its checkpoints in the store) once the
   job is finished, and release the lease. Errors by kind: a bad spec, a dataset path outside
   the policy or an engine :class:`~app_engine.errors.RunInputError` (the user's to fix) fail
   the job at once; anything else is raised again so that Celery retries the delivery, which
   resumes from the checkpoint, until the attempt cap fails the job with the error as reason.

The return value says what happened to this delivery (one of the ``OUTCOME_*`` names or a
terminal status); the job record in Redis is the source of truth, not Celery's task state.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from app_common.events import CANCELLED, CANCELLING, FAILED, QUEUED, RUNNING, SUCCEEDED
from app_common.jobs import ArtifactInfo, JobRecord
from app_common.paths import DataPathError, resolve_data_path
from app_common.settings import Settings
from app_common.spec import JobSpec, SpecError
from app_common.storage import Storage
from app_common.store import JobStore
from worker.files import RunFolderMirror, discard_work
from worker.lease import LeaseHeartbeat, acquire_lease
from worker.tracking import JobTracking

log = logging.getLogger(__name__)

OUTCOME_SKIPPED = "skipped"  # missing, or already terminal: nothing to do
OUTCOME_DUPLICATE = "duplicate"  # another worker holds a live lease on the job
OUTCOME_LEASE_LOST = "lease_lost"  # another worker took the job over while this one ran it

ACTIVE_STATUSES = frozenset({QUEUED, RUNNING, CANCELLING})
TERMINAL_OUTCOMES = frozenset({SUCCEEDED, FAILED, CANCELLED})


def job_out_dir(settings: Settings, job_id: str) -> Path:
    """The engine's ``out_dir`` for a job on this host: checkpoints, ``result.json`` and exported
    files (a work folder: the object store keeps what outlives the delivery)."""
    return Path(settings.artifacts_dir) / job_id


def check_dataset_path(spec: JobSpec, data_dir: Path) -> None:
    """Refuse a ``dataset.path`` the data policy does not allow (app_common.paths, the rule the
    API applies at submission: the folder's content may have changed since)."""
    if spec.dataset.path is None:
        return
    try:
        resolve_data_path(data_dir, spec.dataset.path)
    except DataPathError as exc:
        raise DataPathError(f"dataset.path {exc}") from None


def execute_job(
    job_id: str,
    *,
    store: JobStore,
    settings: Settings,
    storage: Storage | None = None,
    on_cancel_timeout: Callable[[], None] | None = None,
    lease_wait_s: float | None = None,
) -> str:
    """Run one delivery of job ``job_id`` and return what became of it.

    ``storage`` is the object store of the job's checkpoints and files (default: the one the
    settings name).

    ``on_cancel_timeout`` is called (from the heartbeat thread) after a job that ignored its
    cancel flag for the grace period was marked cancelled; the Celery task ends its process
    there. ``lease_wait_s`` (default: one lease TTL and a second) is how long to wait for a lease
    held by someone else to expire before standing down.

    Raises (so that Celery retries) on Redis errors and on run errors that are not the user's,
    below the attempt cap.
    """
    ttl = float(settings.job_lease_ttl_s)
    token = uuid.uuid4().hex
    wait = ttl + 1.0 if lease_wait_s is None else lease_wait_s
    if not acquire_lease(store, job_id, token, ttl, wait_s=wait):
        log.info("job %s: another worker holds its lease; standing down", job_id)
        return OUTCOME_DUPLICATE
    try:
        # The one read of the record in this delivery, under the lease: no other worker changes
        # it from here on; only a cancel request (API) can, and the transitions below are atomic
        # compare-and-set on the status, so a stale read cannot move the job wrongly.
        record = store.get_job(job_id)
        if record is None:
            log.warning("job %s: no such job; nothing to run", job_id)
            return OUTCOME_SKIPPED
        if record.terminal:
            log.info("job %s: already %s; nothing to run", job_id, record.status)
            return OUTCOME_SKIPPED
        storage = storage or settings.open_storage()
        outcome = _execute_leased(
            record, token, store=store, settings=settings, storage=storage, on_cancel_timeout=on_cancel_timeout
        )
        if outcome in TERMINAL_OUTCOMES:
            discard_work(storage, job_id, job_out_dir(settings, job_id))
        return outcome
    finally:
        try:
            store.release_lease(job_id, token)
        except RedisError as exc:  # it expires on its own within one TTL
            log.warning("job %s: could not release the lease (%s)", job_id, exc)


def _execute_leased(
    record: JobRecord,
    token: str,
    *,
    store: JobStore,
    settings: Settings,
    storage: Storage,
    on_cancel_timeout: Callable[[], None] | None,
) -> str:
    job_id = record.id
    if record.cancel_requested:
        # Cancelled while queued, or while a worker that has since died was running it: there is
        # nothing to resume for a cancelled job.
        why = "cancelled before it ran" if record.status == QUEUED else "cancelled by request"
        return _move(store, job_id, CANCELLED, why, ACTIVE_STATUSES)

    attempt = store.next_attempt(job_id)
    if attempt > settings.max_attempts:
        why = f"worker died {attempt - 1} times; giving up"
        log.error("job %s: %s", job_id, why)
        JobTracking(record, settings=settings, store=store, out_dir=job_out_dir(settings, job_id)).end_abandoned()
        return _move(store, job_id, FAILED, why, ACTIVE_STATUSES)

    resumed = None if attempt == 1 else f"attempt {attempt}: resuming after a lost worker"
    if not store.transition(job_id, RUNNING, reason=resumed, allowed_from={QUEUED, RUNNING}):
        # Cancelled between our read and now: read again to see how far the cancel went.
        current = store.get_job(job_id)
        if current is not None and current.status == CANCELLING:
            return _move(store, job_id, CANCELLED, "cancelled before it ran", {CANCELLING})
        return OUTCOME_SKIPPED if current is None else current.status

    heartbeat = LeaseHeartbeat(
        store,
        job_id,
        token,
        float(settings.job_lease_ttl_s),
        cancel_grace_s=settings.cancel_grace_s,
        on_cancel_timeout=on_cancel_timeout,
    )
    heartbeat.start()
    # MLflow, when the settings name a tracking server (mlflow is imported only then).
    tracking = JobTracking(record, settings=settings, store=store, out_dir=job_out_dir(settings, job_id))
    try:
        outcome = _run_engine(
            job_id, record.spec, attempt=attempt, store=store, settings=settings, storage=storage, heartbeat=heartbeat,
            tracking=tracking,
        )
        tracking.end(outcome)  # failed or cancelled (succeeded: already ended); a retry continues the run
        return outcome
    finally:
        tracking.close()  # raised: send what is queued (bounded) and leave the run to the retry
        heartbeat.stop()


def _run_engine(
    job_id: str,
    spec_dict: dict[str, Any],
    *,
    attempt: int,
    store: JobStore,
    settings: Settings,
    storage: Storage,
    heartbeat: LeaseHeartbeat,
    tracking: JobTracking,
) -> str:
    # The engine imports torch: only here, in the process that runs the job (the pool child).
    from app_engine.errors import RunInputError
    from app_engine.runner import run
    from worker.dataset_cache import load_job_data
    from worker.sink import DRAIN_TIMEOUT_S, RedisProgressSink

    sink = RedisProgressSink(store, job_id, interrupt=heartbeat.interrupt_reason)
    heartbeat.on_beat = sink.flush  # events buffered in a Redis outage are written as soon as it ends
    # Before the sink: a checkpoint_written event in the stream means the checkpoint is stored.
    mirror = RunFolderMirror(storage, job_id, job_out_dir(settings, job_id), interrupt=heartbeat.interrupt_reason)
    try:
        spec = JobSpec.from_dict(spec_dict)
        check_dataset_path(spec, Path(settings.data_dir))
        # An uploaded dataset (dataset.id) comes from this host's cache; the spec stays as submitted.
        data = load_job_data(spec, store=store, storage=storage, settings=settings)
        mirror.fetch()
        tracking.warn = sink  # its one warning in order with the run's events
        outcome = run(spec, mirror.out_dir, callbacks=[mirror, sink, tracking], data=data,
                      data_root=Path(settings.data_dir))
        if not outcome.stopped and not heartbeat.lease_lost:
            mirror.upload_artifacts(outcome.artifacts)
    except RedisError:
        # Not the job's fault: let the task retry; a redelivery resumes from the checkpoint.
        raise
    except (SpecError, DataPathError, RunInputError) as exc:
        # Bad spec, a dataset path or file the server refuses, a config the engine refuses: the
        # user's to fix, so fail at once without retrying.
        if heartbeat.lease_lost:
            return OUTCOME_LEASE_LOST
        log.info("job %s: failed: %s", job_id, exc)
        return _finish(store, job_id, FAILED, public_reason(str(exc), settings))
    except Exception as exc:
        if heartbeat.lease_lost:
            return OUTCOME_LEASE_LOST
        if attempt >= settings.max_attempts:
            log.exception("job %s: the run raised on attempt %d of %d; giving up", job_id, attempt,
                          settings.max_attempts)
            return _finish(store, job_id, FAILED, public_reason(f"{type(exc).__name__}: {exc}", settings))
        # Perhaps transient (a full disk, a CUDA error, the object store unreachable): try again
        # from the last checkpoint in the store with the next delivery.
        log.exception("job %s: the run raised on attempt %d of %d; retrying", job_id, attempt, settings.max_attempts)
        raise

    # Events buffered during a Redis outage first: the final status must not overtake them.
    # (Stops at once, dropping them, when the job is no longer this worker's.)
    drained = sink.drain(DRAIN_TIMEOUT_S)
    if heartbeat.lease_lost:
        log.warning("job %s: lost the lease; leaving the job to its new worker", job_id)
        return OUTCOME_LEASE_LOST
    if heartbeat.cancel_forced:
        return CANCELLED  # the heartbeat moved the job to cancelled itself
    if not drained:
        raise RedisConnectionError(f"job {job_id}: Redis unreachable for {DRAIN_TIMEOUT_S:g} s at the end of the run")
    if outcome.stopped:
        if sink.cancel_seen:
            return _finish(store, job_id, CANCELLED, "cancelled by request")
        return _finish(store, job_id, FAILED, f"run stopped: {outcome.stop_reason}")

    # While the job runs, its cancel flag is set exactly when it is cancelling; None: deleted.
    cancel_flag = store.cancel_requested(job_id)
    if cancel_flag is None:
        return OUTCOME_SKIPPED
    artifacts = [
        ArtifactInfo(name=name, format=a["format"], bytes=a["bytes"], sha256=a["sha256"])
        for name, a in outcome.artifacts.items()
    ]
    store.set_result(job_id, outcome.result, artifacts)
    tracking.end(SUCCEEDED)  # before the status: a succeeded job's MLflow run is already FINISHED
    # A cancel that arrived after the last epoch finds the work done: it still succeeds.
    late_cancel = "finished before the cancel took effect" if cancel_flag else None
    return _finish(store, job_id, SUCCEEDED, late_cancel)


# An absolute path in a message: "/" then at least two segments, not inside a URL or a word.
_ABS_PATH = re.compile(r"(?<![\w.:/~>-])/[^\s'\"`:,;()\[\]{}<>]+/[^\s'\"`:,;()\[\]{}<>]*")


def public_reason(message: str, settings: Settings) -> str:
    """``message`` as the job's owner may read it: the server's folders named by their role
    (``dataset.path`` names files under the data folder, so those read as the user wrote them) and
    any other absolute path cut to its file name. The full message stays in the worker's log."""
    roots = [(settings.data_dir, ""), (settings.artifacts_dir, "<work>/"), (settings.cache_dir, "<cache>/"),
             (settings.storage_dir, "<store>/")]
    for root, label in roots:
        for form in {str(root.resolve()), str(root.absolute())}:
            message = message.replace(form.rstrip("/") + "/", label)
    return _ABS_PATH.sub(lambda m: "<server>/" + m[0].rstrip("/").rsplit("/", 1)[-1], message)


def _finish(store: JobStore, job_id: str, status: str, reason: str | None) -> str:
    return _move(store, job_id, status, reason, {RUNNING, CANCELLING}, warn=True)


def _move(
    store: JobStore, job_id: str, status: str, reason: str | None, allowed_from: Iterable[str], *, warn: bool = False
) -> str:
    """Move the job to ``status``; returns the status it has afterwards. When the move is refused
    someone else changed the job meanwhile, so that is the one case that reads it again."""
    if store.transition(job_id, status, reason=reason, allowed_from=allowed_from):
        return status
    current = store.get_job(job_id)
    now = OUTCOME_SKIPPED if current is None else current.status
    if warn:
        log.warning("job %s: could not mark it %s; it is %s", job_id, status, now)
    return now
