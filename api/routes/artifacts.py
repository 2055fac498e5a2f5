"""/api/v1/artifacts: downloads through signed, expiring links (no API key needed).

Served only with the local storage backend: with an object store the job's links are the store's
own presigned URLs (api/routes/jobs.py), and the files never pass through the API.
"""

from __future__ import annotations

import mimetypes
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from starlette.datastructures import Headers
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from api.deps import SecretDep, StorageDep, StoreDep
from api.errors import ApiProblem, problem_response, problem_responses
from api.routes.models import stored_models
from api.signing import verify
from app_common.events import SUCCEEDED
from app_common.megabatch_models import megabatch_of
from app_common.public import artifact_infos
from app_common.storage import artifact_key

router = APIRouter(prefix="/artifacts", tags=["artifacts"])

# Formats the engine writes whose content type mimetypes does not know.
_MEDIA_TYPES = {".safetensors": "application/octet-stream", ".onnx": "application/octet-stream",
                ".npz": "application/octet-stream", ".svg": "image/svg+xml"}


class _Download(FileResponse):
    """A file with Range errors as problem documents: an unsatisfiable range is a 416 (with
    ``Content-Range: bytes */size``); one that does not parse (``bytes=5-1``) is ignored, and the
    whole file is sent (RFC 9110 section 14.2 lets a server ignore a Range header)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        http_range = Headers(scope=scope).get("range")
        if http_range is not None and self.stat_result is not None:
            size = self.stat_result.st_size
            try:
                self._parse_range_header(http_range, size)
            except RangeNotSatisfiable:
                response = problem_response(416, f"the range is outside the file ({size} bytes)",
                                            slug="range-not-satisfiable", headers={"Content-Range": f"bytes */{size}"})
                await response(scope, receive, send)
                return
            except MalformedRangeHeader:
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"range"]}
        await super().__call__(scope, receive, send)


def _etag_matches(if_none_match: str, etag: str) -> bool:
    """If-None-Match's weak comparison (RFC 9110 section 13.1.2): ``*`` or any listed tag."""
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


def media_type_for(name: str) -> str:
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if suffix in _MEDIA_TYPES:
        return _MEDIA_TYPES[suffix]
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


_BINARY: dict[str, Any] = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


@router.get(
    "/{job_id}/{name:path}",
    operation_id="download_artifact",
    summary="Download one file of a job through a signed link",
    response_class=FileResponse,
    responses={
        200: {"description": "The file; `ETag` is its sha256.", "content": _BINARY},
        206: {"description": "The requested byte ranges (`Range`).", "content": _BINARY},
        304: {"description": "`If-None-Match` names the file's ETag: not modified."},
        **problem_responses(403, 404, 416, 422),
    },
)
@router.head("/{job_id}/{name:path}", include_in_schema=False)  # the headers of GET (FileResponse sends no body)
async def download_artifact(
    job_id: str,
    name: str,
    store: StoreDep,
    storage: StorageDep,
    secret: SecretDep,
    expires: Annotated[int, Query(ge=0, le=2**53, description="Unix time the link expires.")],
    sig: Annotated[str, Query(min_length=1, max_length=128, description="HMAC-SHA256 of job_id/name/expires.")],
    if_none_match: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    if (why := verify(secret, job_id, name, expires, sig)) is not None:
        raise ApiProblem(403, f"download link refused: {why}", slug="bad-download-link")
    record = await run_in_threadpool(store.get_job, job_id)
    kept = megabatch_of(name) is not None  # a megabatch's model: served while the job runs too
    if record is None or (record.status != SUCCEEDED and not kept):
        raise ApiProblem(404, f"no artifacts for job {job_id}", slug="artifact-not-found")
    # Only files the worker listed can be served: a signed name still cannot reach other paths.
    if kept:
        info = (await run_in_threadpool(stored_models, storage, job_id)).file(name)
    else:
        info = next((a for a in artifact_infos(record) if a.name == name), None)
    missing = ApiProblem(404, f"job {job_id} has no artifact {name!r}", slug="artifact-not-found")
    if info is None:
        raise missing
    # Listed names are plain file names or a megabatch's two files, so the key stays inside the job's files.
    path = storage.local_path(artifact_key(job_id, name))
    if path is None or not path.is_file():
        raise missing
    headers = {"ETag": f'"{info.sha256}"', "Cache-Control": "private, max-age=60"}
    if if_none_match is not None and _etag_matches(if_none_match, headers["ETag"]):
        return Response(status_code=304, headers=headers)
    return _Download(path, media_type=media_type_for(name), filename=name.replace("/", "-"), headers=headers,
                     stat_result=path.stat())
