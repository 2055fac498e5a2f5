"""/api/v1/jobs: submit, list, read, cancel, delete, follow (SSE), metrics and artifact links."""

from __future__ import annotations

import logging
import shutil
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.security.utils import get_authorization_scheme_param
from sse_starlette import EventSourceResponse

from api.deps import OwnerDep, SecretDep, SettingsDep, StorageDep, StoreDep
from api.errors import ApiProblem, problem_responses, validation_problem
from api.links import DownloadLinks
from api.pagination import PageCursor, PageLimit, invalid_cursor
from api.ratelimit import SubmitRateLimit
from api.routes.webhooks import check_notify_url
from api.schemas import (
    ArtifactPublic,
    FieldError,
    JobCreate,
    JobList,
    JobMetrics,
    JobPublic,
    JobStatus,
)
from api.sse import StreamSlots, event_source
from app_common.datasets import READY
from app_common.events import SUCCEEDED
from app_common.jobs import JobRecord
from app_common.paths import DataPathError, resolve_data_path
from app_common.public import artifact_infos
from app_common.settings import Settings
from app_common.spec import JobSpec
from app_common.storage import StorageError, job_prefix
from app_common.store import InvalidCursor, JobStore, TooManyActiveJobs, hash_secret

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

# A stream id as XREAD takes it ("5" is "5-0"); 19 digits keep each part below 2**64, so every id
# the schema admits is one Redis accepts.
_STREAM_ID = r"^[0-9]{1,19}(-[0-9]{1,19})?$"
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Retrying a POST with the same key and body replays the first answer.",
    ),
]


# --- helpers ----------------------------------------------------------------------------------
def to_public(record: JobRecord) -> JobPublic:
    return JobPublic.from_record(record)


def owned_job(store: JobStore, job_id: str, owner: str) -> JobRecord:
    """The job if it exists and belongs to ``owner``; another key's job is indistinguishable from
    a missing one (404), so ids cannot be probed."""
    record = store.get_job(job_id)
    if record is None or record.owner != owner:
        raise ApiProblem(404, f"no job {job_id}", slug="job-not-found")
    return record


def check_server_limits(spec: JobSpec, settings: Settings) -> str:
    """Validate what the spec schema cannot know (this server's limits, its data folder, its
    workers); returns the queue the job goes to. Raises a 422 problem naming each field."""
    errors: list[FieldError] = []
    if spec.training.epochs > settings.max_epochs:
        errors.append(FieldError(field="training.epochs", reason=f"at most {settings.max_epochs} on this server"))
    if spec.stream.megabatches > settings.max_megabatches:
        errors.append(
            FieldError(field="stream.megabatches", reason=f"at most {settings.max_megabatches} on this server")
        )
    if spec.dataset.path is not None:
        try:
            resolve_data_path(settings.data_dir, spec.dataset.path)
        except DataPathError as exc:
            errors.append(FieldError(field="dataset.path", reason=str(exc)))
    queue = settings.queue_for_device(spec.training.device)
    if queue is None:
        errors.append(
            FieldError(
                field="training.device",
                reason=f"no worker serves {spec.training.device!r} here (queues: {', '.join(settings.queues)})",
            )
        )
    if errors:
        raise validation_problem(errors)
    return queue or settings.default_queue


def with_uploaded_dataset(spec: JobSpec, owner: str, store: JobStore) -> JobSpec:
    """The spec to store for a job on an uploaded dataset (``dataset.id``): the dataset must be the
    owner's (else 422 naming ``dataset.id``) and ``ready`` (else 409); ``dataset.name`` defaults to
    its format and must equal it when given (else 422 naming ``dataset.name``)."""
    dataset_id = spec.dataset.id
    if dataset_id is None:
        return spec
    dataset = store.get_dataset(dataset_id)
    if dataset is None or dataset.owner != owner:
        raise validation_problem([FieldError(field="dataset.id", reason=f"you have no dataset {dataset_id}")])
    if "name" in spec.dataset.model_fields_set and spec.dataset.name != dataset.format:
        raise validation_problem([FieldError(
            field="dataset.name", reason=f"dataset {dataset_id} is {dataset.format!r}, not {spec.dataset.name!r}"
        )])
    if dataset.status != READY:
        detail = f"dataset {dataset_id} is {dataset.status}" + (f": {dataset.error}" if dataset.error else "")
        raise ApiProblem(409, detail + "; jobs may use only ready datasets", slug="dataset-not-ready")
    filled = spec.to_dict()
    filled["dataset"]["name"] = dataset.format
    return JobSpec.model_validate(filled)


def _job_created(body: dict[str, Any], *, replayed: bool = False) -> JSONResponse:
    headers = {"Location": body["urls"]["self"]}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(body, status_code=202, headers=headers)


# --- routes -----------------------------------------------------------------------------------
@router.post(
    "",
    operation_id="create_job",
    status_code=202,
    response_model=JobPublic,
    summary="Submit a job",
    responses=problem_responses(401, 409, 413, 422, 429, 503),
    description=(
        "Validates the spec against the schema and this server's limits, stores the job (status "
        "`queued`) and queues it behind the key's own queued jobs (keys take turns: another key's "
        "backlog never delays this one). Answers 202 with `Location`. Each API key may submit "
        "`APP_SUBMIT_RATE_LIMIT` jobs (default 30 a minute; 429 with `Retry-After` beyond) and hold "
        "`APP_MAX_CONCURRENT_JOBS_PER_KEY` queued or running jobs (429). With an `Idempotency-Key`, a retry "
        "with the same key and body replays the first answer (202, same job, header "
        "`Idempotent-Replayed: true`); the same key with a different body is a 422 naming "
        "`Idempotency-Key`; a retry while the first request is still being handled is a 409. "
        "`training.device: cuda` is accepted only when the server has a `gpu` queue (see the catalog)."
    ),
)
def create_job(
    body: JobCreate,
    request: Request,
    owner: OwnerDep,
    settings: SettingsDep,
    store: StoreDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    spec = body.job_spec()
    queue = check_server_limits(spec, settings)
    check_notify_url(body.notify, settings)  # where webhooks may go (a name lookup, bounded in time)
    submit_limit: SubmitRateLimit | None = request.app.state.submit_limit
    if submit_limit is not None:
        submit_limit.check(owner)
    # The validated spec with defaults filled, so two bodies that mean the same job match (the
    # service options notify and tracking are not part of it).
    fingerprint = spec.fingerprint(length=64)
    if idempotency_key is not None:
        previous = store.reserve_idempotency(owner, idempotency_key, fingerprint, settings.idempotency_ttl_s)
        if previous is not None:
            if previous["fingerprint"] != fingerprint:
                raise validation_problem(
                    [FieldError(field="Idempotency-Key", reason="already used with a different request body")]
                )
            if previous["response"] is None:
                raise ApiProblem(409, "a request with this Idempotency-Key is still being handled",
                                 slug="idempotency-in-progress", headers={"Retry-After": "1"})
            return _job_created(previous["response"]["body"], replayed=True)
    try:
        record = _create_and_enqueue(with_uploaded_dataset(spec, owner, store), body, owner, queue, settings, store)
    except BaseException:
        if idempotency_key is not None:
            try:
                store.release_idempotency(owner, idempotency_key)
            except redis.exceptions.RedisError:
                log.warning("could not release Idempotency-Key %r of %s", idempotency_key, owner)
        raise
    public = to_public(record).model_dump(mode="json")
    if idempotency_key is not None:
        store.complete_idempotency(
            owner, idempotency_key, fingerprint, {"status_code": 202, "body": public}, settings.idempotency_ttl_s
        )
    return _job_created(public)


def _create_and_enqueue(
    spec: JobSpec, options: JobCreate, owner: str, queue: str, settings: Settings, store: JobStore
) -> JobRecord:
    try:
        record = store.create_job(
            owner, spec.to_dict(), queue=queue, max_active=settings.max_concurrent_jobs_per_key,
            notify=options.notify, tracking=options.tracking,
        )
    except TooManyActiveJobs:
        raise ApiProblem(
            429,
            f"at most {settings.max_concurrent_jobs_per_key} queued or running jobs per API key",
            slug="too-many-jobs",
            headers={"Retry-After": "30"},
        ) from None
    try:
        # The owner's queue in the store; an idle training worker pops it (fair dispatch).
        store.enqueue_job(queue, owner, record.id)
        log.info("job %s queued on %s", record.id, queue)
    except redis.exceptions.RedisError as exc:  # Redis went away between the two writes
        log.warning("job %s could not be queued: %s", record.id, exc)
        try:
            store.transition(record.id, "failed", reason="could not be queued: the job store was unreachable",
                             allowed_from={"queued"})
        except redis.exceptions.RedisError:
            log.warning("job %s could not be marked failed", record.id)
        raise ApiProblem(503, "the job queue is unavailable; try again", slug="queue-unavailable",
                         headers={"Retry-After": "2"}) from exc
    return record


@router.get(
    "",
    operation_id="list_jobs",
    response_model=JobList,
    summary="List your jobs, newest first",
    responses=problem_responses(401, 422, 503),
)
def list_jobs(
    request: Request,
    owner: OwnerDep,
    store: StoreDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs with this status.")] = None,
    limit: PageLimit = 20,
    cursor: PageCursor = None,
) -> JobList:
    try:
        records, next_cursor = store.list_jobs(owner, status=status, cursor=cursor, limit=limit)
    except InvalidCursor:
        raise invalid_cursor() from None
    return JobList(items=[to_public(r) for r in records], next_cursor=next_cursor)


@router.get(
    "/{job_id}",
    operation_id="get_job",
    response_model=JobPublic,
    summary="Read a job",
    responses=problem_responses(401, 404, 503),
)
def get_job(job_id: str, request: Request, owner: OwnerDep, store: StoreDep) -> JobPublic:
    return to_public(owned_job(store, job_id, owner))


@router.post(
    "/{job_id}/cancel",
    operation_id="cancel_job",
    response_model=JobPublic,
    summary="Cancel a job",
    responses={
        202: {"description": "Running: now `cancelling`; the worker stops within an epoch.", "model": JobPublic},
        **problem_responses(401, 404, 409, 503),
    },
    description="A queued job is cancelled at once (200); a running one becomes `cancelling` (202). "
    "A finished job cannot be cancelled (409).",
)
def cancel_job(
    job_id: str, request: Request, owner: OwnerDep, store: StoreDep, settings: SettingsDep, response: Response
) -> JobPublic:
    record = owned_job(store, job_id, owner)
    if record.terminal:
        raise ApiProblem(409, f"job {job_id} is already {record.status}", slug="job-finished")
    after = store.request_cancel(job_id)
    if after is None:
        raise ApiProblem(404, f"no job {job_id}", slug="job-not-found")
    if after.terminal and after.status != "cancelled":
        raise ApiProblem(409, f"job {job_id} is already {after.status}", slug="job-finished")
    if record.status == "queued" and after.status == "cancelled":
        # Off its queue: a cancelled job never reaches a worker.
        store.unqueue_job(after.queue or settings.default_queue, owner, job_id)
    response.status_code = 200 if after.status == "cancelled" else 202
    return to_public(after)


@router.delete(
    "/{job_id}",
    operation_id="delete_job",
    status_code=204,
    summary="Delete a finished job, its events and its artifacts",
    responses=problem_responses(401, 404, 409, 503),
)
def delete_job(
    job_id: str, owner: OwnerDep, store: StoreDep, storage: StorageDep, settings: SettingsDep
) -> Response:
    record = owned_job(store, job_id, owner)
    if not record.terminal:
        raise ApiProblem(409, f"job {job_id} is {record.status}: cancel it first", slug="job-not-finished")
    store.delete_job(job_id)
    store.unqueue_job(record.queue or settings.default_queue, owner, job_id)
    try:
        storage.delete_prefix(job_prefix(job_id))
    except StorageError as exc:  # the record is gone; the files only cost space
        log.warning("job %s: could not delete its files from the store (%s)", job_id, exc)
    # A work folder a killed worker left on this host (one-host deployments share the folder).
    folder = settings.artifacts_dir / job_id
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    return Response(status_code=204)


@router.get(
    "/{job_id}/events",
    operation_id="job_events",
    summary="Follow a job's events (Server-Sent Events)",
    response_class=EventSourceResponse,
    responses={
        # The content (each message's shape) is filled in by api.main's OpenAPI hook.
        200: {"description": "`text/event-stream`: `id:` stream id, `event:` type, `data:` the event as JSON."},
        **problem_responses(401, 404, 422, 429, 503),
    },
    description="Sends every stored event (or those after `Last-Event-ID` / `last_event_id`), then "
    "new ones as they happen; a comment line keeps the connection alive while idle. The stream ends "
    "after the job is finished and all its events were sent. One API key may hold "
    "`APP_MAX_STREAMS_PER_KEY` open streams across all API processes (429 with `Retry-After` beyond); an "
    "open stream of a key that is revoked ends with an `error` event.",
)
async def job_events(
    job_id: str,
    request: Request,
    owner: OwnerDep,
    store: StoreDep,
    settings: SettingsDep,
    last_event_id: Annotated[str | None, Query(pattern=_STREAM_ID, description="Resume after this event id.")] = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID", pattern=_STREAM_ID)] = None,
) -> EventSourceResponse:
    after = last_event_id_header or last_event_id or "0-0"
    await run_in_threadpool(owned_job, store, job_id, owner)
    slots: StreamSlots = request.app.state.stream_slots
    # The key's digest lets the stream notice a revocation (None with authentication off).
    _, secret = get_authorization_scheme_param(request.headers.get("Authorization"))
    slot = await slots.acquire(owner, hash_secret(secret) if settings.auth_enabled and secret else None)
    if slot is None:
        raise ApiProblem(429, f"at most {slots.per_key} open event streams per API key", slug="too-many-streams",
                         headers={"Retry-After": str(max(1, round(settings.sse_heartbeat_s)))})
    try:
        feed = store.event_feed(
            settings.redis_url or "", job_id, block_s=settings.sse_heartbeat_s, timeout_s=settings.redis_timeout_s,
            pool=request.app.state.stream_pool,
        )
    except BaseException:
        await slot.release()
        raise
    return event_source(feed, after, heartbeat_s=settings.sse_heartbeat_s, timeout_s=settings.redis_timeout_s,
                        slot=slot)


@router.get(
    "/{job_id}/metrics",
    operation_id="job_metrics",
    response_model=JobMetrics,
    summary="Metric history per megabatch and per epoch",
    responses=problem_responses(401, 404, 503),
)
def job_metrics(job_id: str, owner: OwnerDep, store: StoreDep) -> JobMetrics:
    owned_job(store, job_id, owner)
    return JobMetrics(**store.history(job_id))


@router.get(
    "/{job_id}/artifacts",
    operation_id="job_artifacts",
    response_model=list[ArtifactPublic],
    summary="Download links of a succeeded job's files",
    responses=problem_responses(401, 404, 409, 503),
    description="Each `download_url` is signed and expires (`expires_at`); it works without the API key.",
)
def job_artifacts(
    job_id: str,
    request: Request,
    owner: OwnerDep,
    store: StoreDep,
    storage: StorageDep,
    settings: SettingsDep,
    secret: SecretDep,
) -> list[ArtifactPublic]:
    record = owned_job(store, job_id, owner)
    if record.status != SUCCEEDED:
        raise ApiProblem(409, f"job {job_id} is {record.status}: artifacts exist once it succeeded",
                         slug="job-not-succeeded")
    links = DownloadLinks(request, storage, settings, secret, job_id)
    return [links.artifact(info) for info in artifact_infos(record)]
