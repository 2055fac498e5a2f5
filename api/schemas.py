"""HTTP schemas, named by role: ``JobCreate`` (request body), ``JobPublic`` (what a client sees),
``JobList``, ``ArtifactPublic``, ``Problem``... The request body *is* the job spec of
``app_common.spec``, so the OpenAPI document shows the one real schema."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from app_common.events import STATUSES
from app_common.spec import JobSpec

# The request body of POST /api/v1/jobs: the job spec itself.
JobCreate = JobSpec

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
if set(get_args(JobStatus)) != set(STATUSES):  # one list of statuses, checked at import
    raise RuntimeError("api.schemas.JobStatus and app_common.events.STATUSES disagree")


class FieldErrorOut(BaseModel):
    field: str = Field(description="Dotted path of the bad field, e.g. sparsity.target.")
    reason: str


class Problem(BaseModel):
    """RFC 9457 problem details, served as application/problem+json."""

    type: str = Field(description="URI naming the kind of problem; about:blank for plain HTTP errors.")
    title: str
    status: int
    detail: str
    errors: list[FieldErrorOut] = Field(default_factory=list)


class Progress(BaseModel):
    megabatch: int = Field(description="Megabatches done (or in progress), 1-based; 0 before the first.")
    megabatches: int | None
    epoch: int
    epochs: int | None
    fraction: float = Field(ge=0.0, le=1.0, description="Share of the whole run done.")


class ArtifactInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    format: str
    bytes: int
    sha256: str


class ArtifactPublic(ArtifactInfo):
    download_url: str = Field(description="Signed, expiring link; works without the API key.")
    expires_at: datetime


class JobUrls(BaseModel):
    self: str
    events: str
    metrics: str
    artifacts: str
    cancel: str


class JobPublic(BaseModel):
    id: str
    status: JobStatus
    queue: str
    spec: JobSpec
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    error: str | None
    attempt: int
    progress: Progress
    latest_metrics: dict[str, Any] | None
    result: dict[str, Any] | None
    artifacts: list[ArtifactInfo]
    cancel_requested: bool
    urls: JobUrls


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
