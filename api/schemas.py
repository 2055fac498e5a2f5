"""HTTP schemas, named by role: ``JobCreate`` (request body), ``JobPublic`` (what a client sees),
``JobList``, ``ArtifactPublic``, ``Problem``... The request body *is* the job spec of
``app_common.spec``, so the OpenAPI document shows the one real schema."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app_common.jobs import ArtifactInfo, JobRecord, JobState, JobStatus, Progress
from app_common.spec import FieldError, JobSpec

__all__ = [
    "ArtifactInfo",
    "ArtifactPublic",
    "Catalog",
    "FieldError",
    "Health",
    "JobCreate",
    "JobList",
    "JobMetrics",
    "JobPublic",
    "JobStatus",
    "JobUrls",
    "Limits",
    "Problem",
    "Progress",
]

# The request body of POST /api/v1/jobs: the job spec itself.
JobCreate = JobSpec


class Problem(BaseModel):
    """RFC 9457 problem details, served as application/problem+json."""

    type: str = Field(description="URI naming the kind of problem; about:blank for plain HTTP errors.")
    title: str
    status: int
    detail: str
    errors: list[FieldError] = Field(default_factory=list)


class ArtifactPublic(ArtifactInfo):
    download_url: str = Field(description="Signed, expiring link; works without the API key.")
    expires_at: datetime


class JobUrls(BaseModel):
    self: str
    events: str
    metrics: str
    artifacts: str
    cancel: str


class JobPublic(JobState[JobSpec]):
    """A job as its owner sees it: the stored record without the owner, with links."""

    urls: JobUrls

    @classmethod
    def from_record(cls, record: JobRecord, *, urls: JobUrls, artifacts: list[ArtifactInfo]) -> JobPublic:
        fields: dict[str, Any] = {name: getattr(record, name) for name in JobState.model_fields}
        return cls.model_validate(fields | {"spec": record.spec, "artifacts": artifacts, "urls": urls})


class JobList(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last.")


class JobMetrics(BaseModel):
    megabatches: list[dict[str, Any]] = Field(description="One point per finished megabatch, in order.")
    epochs: list[dict[str, Any]] = Field(description="One point per finished epoch, by (megabatch, epoch).")


class Limits(BaseModel):
    max_epochs: int
    max_megabatches: int
    max_concurrent_jobs_per_key: int
    max_body_bytes: int
    download_url_ttl_s: int


class Catalog(BaseModel):
    datasets: list[str]
    datasets_with_path: list[str]
    architectures: list[str]
    methods: list[str]
    pruners: list[str]
    scopes: list[str]
    replays: list[str]
    precisions: list[str]
    devices: list[str] = Field(description="Values of training.device this server accepts.")
    export_formats: list[str]
    augmentations: list[str]
    queues: list[str]
    limits: Limits


class Health(BaseModel):
    status: str
