"""A job as its owner sees it, built in one place for every process that shows it.

``GET /api/v1/jobs/{id}`` answers :class:`JobPublic`; webhook deliveries (sent by the control
worker, which has no HTTP request to build links from) carry the same document as their ``data``.
Links are therefore paths under :data:`API_PREFIX`, written from templates here; the API's tests
check each template against the route it names.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel

from app_common.jobs import ArtifactInfo, JobRecord, JobState
from app_common.megabatch_models import megabatch_of
from app_common.spec import JobSpec

log = logging.getLogger(__name__)

# Every route of the API but the health, metrics, docs and dashboard pages lives under this prefix.
API_PREFIX = "/api/v1"


class JobUrls(BaseModel):
    self: str
    events: str
    metrics: str
    artifacts: str
    models: str
    cancel: str

    @classmethod
    def for_job(cls, job_id: str) -> JobUrls:
        base = f"{API_PREFIX}/jobs/{quote(job_id, safe='')}"
        return cls(self=base, events=f"{base}/events", metrics=f"{base}/metrics", artifacts=f"{base}/artifacts",
                   models=f"{base}/models", cancel=f"{base}/cancel")


def safe_artifact_name(name: str) -> bool:
    """A plain file name inside the job folder (no separators, no parent, no hidden files), or one
    of a megabatch's kept files (``megabatch-0003/model.sparse.safetensors``, nothing else with a
    folder: see app_common.megabatch_models)."""
    if megabatch_of(name) is not None:
        return True
    return bool(name) and "/" not in name and "\\" not in name and "\x00" not in name and not name.startswith(".")


def artifact_infos(record: JobRecord) -> list[ArtifactInfo]:
    """The record's artifacts that may be served (see :func:`safe_artifact_name`)."""
    out = []
    for info in record.artifacts:
        if safe_artifact_name(info.name):
            out.append(info)
        else:
            log.warning("job %s: ignoring artifact entry with unsafe name %r", record.id, info.name)
    return out


class JobPublic(JobState[JobSpec]):
    """A job as its owner sees it: the stored record without the owner, with links."""

    urls: JobUrls

    @classmethod
    def from_record(cls, record: JobRecord) -> JobPublic:
        fields: dict[str, Any] = {name: getattr(record, name) for name in JobState.model_fields}
        return cls.model_validate(
            fields | {"spec": record.spec, "artifacts": artifact_infos(record), "urls": JobUrls.for_job(record.id)}
        )


def public_job(record: JobRecord) -> dict[str, Any]:
    """The JSON document of ``GET /api/v1/jobs/{id}`` for ``record``."""
    return JobPublic.from_record(record).model_dump(mode="json")
