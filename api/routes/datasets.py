"""/api/v1/datasets: announce an upload, send the file (streamed through the API, or presigned
straight to the object store), read, list and delete datasets.

A dataset belongs to the API key that created it; for any other key it does not exist (404). The
streamed upload never holds the file in memory: the request body goes, in bounded chunks, through
a small queue to a worker thread that hashes it and writes it to the store, so the event loop
never blocks and memory stays flat whatever the file's size. Every refused upload (too large, cut
off, wrong sha256) leaves nothing in the store and the dataset ``uploading``, so the client may
send it again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import Annotated

import anyio
import anyio.from_thread
import anyio.to_thread
from celery import Celery
from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from api.deps import CeleryDep, OwnerDep, SettingsDep, StorageDep, StoreDep, public_base
from api.errors import ApiProblem, problem_responses, validation_problem
from api.pagination import PageCursor, PageLimit, invalid_cursor
from api.queue import enqueue_validation
from api.schemas import (
    DatasetCreate,
    DatasetList,
    DatasetPublic,
    DatasetStatus,
    DatasetUrls,
    FieldError,
    PresignedPostInfo,
    UploadInfo,
)
from app_common.datasets import UPLOADING, VALIDATING, DatasetRecord
from app_common.settings import Settings
from app_common.storage import ObjectTooLarge, Storage, StorageError, StoredObject, dataset_key
from app_common.store import DatasetInUse, InvalidCursor, JobStore

log = logging.getLogger(__name__)

router = APIRouter(prefix="/datasets", tags=["datasets"])

# The PUT route's path below the API prefix; api.main exempts it from the body-size limit.
CONTENT_PATH = r"/datasets/[^/]+/content"
# The body goes to the store in pieces of about this size; at most _QUEUED of them wait at once,
# so an upload holds at most (_QUEUED + 2) * _PIECE bytes in the API whatever the file's size.
_PIECE = 1024 * 1024
_QUEUED = 4


# --- helpers ----------------------------------------------------------------------------------
def dataset_urls(request: Request, dataset_id: str) -> DatasetUrls:
    def path(route: str) -> str:
        return str(request.app.url_path_for(route, dataset_id=dataset_id))

    return DatasetUrls(
        self=path("get_dataset"), content=path("upload_dataset_content"), complete=path("complete_dataset_upload")
    )


def upload_info(record: DatasetRecord, request: Request, settings: Settings, storage: Storage) -> UploadInfo | None:
    """How to send the file while the dataset waits for it: the PUT through the API always, and a
    presigned POST whose policy limits the size to the declared bytes where the store has them."""
    if record.status != UPLOADING:
        return None
    base = public_base(request, settings)
    post = storage.presigned_post(
        dataset_key(record.id), max_bytes=record.bytes, expires_s=settings.download_url_ttl_s
    )
    return UploadInfo(
        put_url=base + str(request.app.url_path_for("upload_dataset_content", dataset_id=record.id)),
        post=None if post is None else PresignedPostInfo(url=post.url, fields=post.fields, expires_at=post.expires_at),
    )


def to_public(record: DatasetRecord, request: Request, settings: Settings, storage: Storage) -> DatasetPublic:
    return DatasetPublic.from_record(
        record, urls=dataset_urls(request, record.id), upload=upload_info(record, request, settings, storage)
    )


def owned_dataset(store: JobStore, dataset_id: str, owner: str) -> DatasetRecord:
    """The dataset if it exists and belongs to ``owner``; another key's dataset is
    indistinguishable from a missing one (404), so ids cannot be probed."""
    record = store.get_dataset(dataset_id)
    if record is None or record.owner != owner:
        raise ApiProblem(404, f"no dataset {dataset_id}", slug="dataset-not-found")
    return record


def uploading_dataset(store: JobStore, dataset_id: str, owner: str) -> DatasetRecord:
    """The owner's dataset while it still waits for its file; 409 once the file was received."""
    record = owned_dataset(store, dataset_id, owner)
    if record.status != UPLOADING:
        raise _not_uploading(record)
    return record


def _not_uploading(record: DatasetRecord) -> ApiProblem:
    return ApiProblem(409, f"dataset {record.id} is {record.status}: its file was already received",
                      slug="dataset-not-uploading")


def _bytes_problem(reason: str) -> ApiProblem:
    return validation_problem([FieldError(field="bytes", reason=reason)])


def _start_validation(
    record: DatasetRecord, request: Request, settings: Settings, store: JobStore, storage: Storage, celery_app: Celery
) -> JSONResponse:
    """The file is in the store: ``uploading -> validating`` and the validation task queued; 202."""
    if not store.move_dataset(record.id, VALIDATING, allowed_from={UPLOADING}):
        now = store.get_dataset(record.id)
        if now is None:  # deleted while the file was arriving: do not leave its bytes behind
            storage.delete(dataset_key(record.id))
            raise ApiProblem(404, f"no dataset {record.id}", slug="dataset-not-found")
        raise _not_uploading(now)  # a concurrent upload of the same bytes won
    try:
        enqueue_validation(celery_app, record.id)
    except Exception as exc:  # kombu OperationalError, redis and socket errors: the broker is down
        log.warning("dataset %s could not be queued for validation: %s", record.id, exc)
        # Back to uploading, file kept: sending it again (or POST complete) retries.
        store.move_dataset(record.id, UPLOADING, allowed_from={VALIDATING})
        raise ApiProblem(503, f"the validation queue is unavailable: {exc}", slug="queue-unavailable",
                         headers={"Retry-After": "2"}) from exc
    after = store.get_dataset(record.id) or record
    body = to_public(after, request, settings, storage).model_dump(mode="json")
    return JSONResponse(body, status_code=202)


class _Refused(Exception):
    """An upload refused after (part of) its body was read; raised inside the chunk iterator so
    the store discards what it received."""

    def __init__(self, problem: ApiProblem):
        super().__init__(problem.detail)
        self.problem = problem


async def _stream_to_storage(request: Request, record: DatasetRecord, storage: Storage) -> StoredObject:
    """Copy the request body to the store under the dataset's key, checking size and sha256 on the
    way; raises :class:`ApiProblem` (and stores nothing) when the body is not the declared file.

    The event loop reads the body and groups it into pieces of about ``_PIECE`` bytes; a worker
    thread takes them from a bounded memory stream, hashes them and feeds ``storage.put_stream``.
    """
    send, receive = anyio.create_memory_object_stream[bytes](_QUEUED)
    refused: list[ApiProblem] = []

    async def read_body() -> None:
        received = 0
        piece = bytearray()
        async with send:
            try:
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > record.bytes:
                        refused.append(ApiProblem(413, f"more than the declared {record.bytes} bytes",
                                                  slug="upload-too-large"))
                        return
                    piece += chunk
                    if len(piece) >= _PIECE:
                        await send.send(bytes(piece))
                        piece.clear()
            except ClientDisconnect:
                refused.append(_bytes_problem(f"upload cut off after {received} of {record.bytes} bytes"))
                return
            if piece:
                await send.send(bytes(piece))

    def pieces() -> Iterator[bytes]:
        digest = hashlib.sha256()
        total = 0
        while True:
            try:
                piece = anyio.from_thread.run(receive.receive)
            except anyio.EndOfStream:
                break
            digest.update(piece)
            total += len(piece)
            yield piece
        if refused:
            raise _Refused(refused[0])
        if total != record.bytes:
            raise _Refused(_bytes_problem(f"received {total} bytes, {record.bytes} were declared"))
        if digest.hexdigest() != record.sha256:
            raise _Refused(validation_problem(
                [FieldError(field="sha256", reason=f"the file received has sha256 {digest.hexdigest()}")]
            ))

    def write() -> StoredObject:
        return storage.put_stream(dataset_key(record.id), pieces(), max_bytes=record.bytes)

    failure: BaseException | None = None
    stored: StoredObject | None = None
    with receive:
        async with anyio.create_task_group() as group:
            group.start_soon(read_body)
            try:
                stored = await anyio.to_thread.run_sync(write)
            except Exception as exc:
                failure = exc
                group.cancel_scope.cancel()  # stop reading the body
    if isinstance(failure, _Refused):
        raise failure.problem from None
    if isinstance(failure, ObjectTooLarge):
        raise ApiProblem(413, f"more than the declared {record.bytes} bytes", slug="upload-too-large") from None
    if isinstance(failure, StorageError):
        log.warning("dataset %s: the store refused the upload: %s", record.id, failure)
        raise ApiProblem(503, f"the object store is unavailable: {failure}", slug="storage-unavailable",
                         headers={"Retry-After": "2"}) from None
    if failure is not None:
        raise failure
    assert stored is not None
    return stored


# --- routes -----------------------------------------------------------------------------------
@router.post(
    "",
    operation_id="create_dataset",
    status_code=201,
    response_model=DatasetPublic,
    summary="Announce a dataset upload",
    responses=problem_responses(401, 413, 422, 503),
    description=(
        "Stores the dataset (status `uploading`) and answers 201 with `Location` and `upload`: send the file "
        "with `PUT upload.put_url` (streamed through the API), or, when `upload.post` is given, POST it "
        "straight to the object store and then `POST urls.complete`. The file must have exactly the declared "
        "`bytes` and `sha256`; `bytes` may be at most the catalog's `limits.max_dataset_bytes`."
    ),
)
def create_dataset(
    body: DatasetCreate,
    request: Request,
    owner: OwnerDep,
    settings: SettingsDep,
    store: StoreDep,
    storage: StorageDep,
) -> JSONResponse:
    if body.bytes > settings.max_dataset_bytes:
        raise _bytes_problem(f"at most {settings.max_dataset_bytes} bytes on this server")
    record = store.create_dataset(owner, name=body.name, format=body.format, sha256=body.sha256, bytes=body.bytes)
    public = to_public(record, request, settings, storage)
    return JSONResponse(public.model_dump(mode="json"), status_code=201, headers={"Location": public.urls.self})


@router.put(
    "/{dataset_id}/content",
    operation_id="upload_dataset_content",
    status_code=202,
    response_model=DatasetPublic,
    summary="Send the dataset's file (streamed)",
    responses=problem_responses(401, 404, 409, 413, 422, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    description=(
        "The raw file as the body (Content-Length or chunked). More bytes than declared: 413; fewer, or a "
        "connection cut off: 422 naming `bytes`; another sha256: 422 naming `sha256`. In each case nothing "
        "is kept and the dataset stays `uploading`, so the upload may be retried. Success: 202, status "
        "`validating` (the file is checked off the training queue; poll the dataset until `ready` or `invalid`)."
    ),
)
async def upload_dataset_content(
    dataset_id: str,
    request: Request,
    owner: OwnerDep,
    settings: SettingsDep,
    store: StoreDep,
    storage: StorageDep,
    celery_app: CeleryDep,
) -> JSONResponse:
    record = await run_in_threadpool(uploading_dataset, store, dataset_id, owner)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        # Refused before a byte is read: the client learns at once that it sends the wrong file.
        if int(declared) > record.bytes:
            raise ApiProblem(413, f"Content-Length {declared} is more than the declared {record.bytes} bytes",
                             slug="upload-too-large")
        if int(declared) < record.bytes:
            raise _bytes_problem(f"Content-Length {declared} is less than the declared {record.bytes} bytes")
    await _stream_to_storage(request, record, storage)
    return await run_in_threadpool(_start_validation, record, request, settings, store, storage, celery_app)


@router.post(
    "/{dataset_id}/complete",
    operation_id="complete_dataset_upload",
    status_code=202,
    response_model=DatasetPublic,
    summary="Finish a presigned upload",
    responses=problem_responses(401, 404, 409, 422, 503),
    description=(
        "After the file was POSTed straight to the object store (`upload.post`): checks that it arrived with "
        "the declared size (else 422 naming `bytes`, and the object is removed) and starts validation (202, "
        "status `validating`). The sha256 is checked by validation: a mismatch makes the dataset `invalid`."
    ),
)
def complete_dataset_upload(
    dataset_id: str,
    request: Request,
    owner: OwnerDep,
    settings: SettingsDep,
    store: StoreDep,
    storage: StorageDep,
    celery_app: CeleryDep,
) -> JSONResponse:
    record = uploading_dataset(store, dataset_id, owner)
    key = dataset_key(record.id)
    found = storage.stat(key)
    if found is None:
        raise _bytes_problem("no file was uploaded to the store (refused, expired or not sent yet)")
    if found.bytes != record.bytes:
        storage.delete(key)
        raise _bytes_problem(f"the store holds {found.bytes} bytes, {record.bytes} were declared")
    return _start_validation(record, request, settings, store, storage, celery_app)


@router.get(
    "",
    operation_id="list_datasets",
    response_model=DatasetList,
    summary="List your datasets, newest first",
    responses=problem_responses(401, 422, 503),
)
def list_datasets(
    request: Request,
    owner: OwnerDep,
    settings: SettingsDep,
    store: StoreDep,
    storage: StorageDep,
    status: Annotated[DatasetStatus | None, Query(description="Only datasets with this status.")] = None,
    limit: PageLimit = 20,
    cursor: PageCursor = None,
) -> DatasetList:
    try:
        records, next_cursor = store.list_datasets(owner, status=status, cursor=cursor, limit=limit)
    except InvalidCursor:
        raise invalid_cursor() from None
    return DatasetList(items=[to_public(r, request, settings, storage) for r in records], next_cursor=next_cursor)


@router.get(
    "/{dataset_id}",
    operation_id="get_dataset",
    response_model=DatasetPublic,
    summary="Read a dataset",
    responses=problem_responses(401, 404, 503),
)
def get_dataset(
    dataset_id: str, request: Request, owner: OwnerDep, settings: SettingsDep, store: StoreDep, storage: StorageDep
) -> DatasetPublic:
    return to_public(owned_dataset(store, dataset_id, owner), request, settings, storage)


@router.delete(
    "/{dataset_id}",
    operation_id="delete_dataset",
    status_code=204,
    summary="Delete a dataset and its file",
    responses=problem_responses(401, 404, 409, 503),
    description="Refused (409) while a queued or running job of yours uses it.",
)
def delete_dataset(dataset_id: str, owner: OwnerDep, store: StoreDep, storage: StorageDep) -> Response:
    owned_dataset(store, dataset_id, owner)
    try:
        deleted = store.delete_dataset(dataset_id)
    except DatasetInUse as exc:
        raise ApiProblem(409, f"dataset {dataset_id} is used by active jobs: {', '.join(exc.job_ids)}",
                         slug="dataset-in-use") from None
    if not deleted:
        raise ApiProblem(404, f"no dataset {dataset_id}", slug="dataset-not-found")
    try:
        storage.delete(dataset_key(dataset_id))
    except StorageError as exc:  # the record is gone; an orphaned object is only wasted space
        log.warning("dataset %s: its file could not be removed from the store: %s", dataset_id, exc)
    return Response(status_code=204)

