"""HTTP schemas, named by role: ``JobCreate`` (request body), ``JobPublic`` (what a client sees),
``JobList``, ``ArtifactPublic``, ``Problem``... The request body *is* the job spec of
``app_common.spec``, so the OpenAPI document shows the one real schema."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app_common.datasets import SHA256_PATTERN, DatasetFormat, DatasetRecord, DatasetState, DatasetStatus
from app_common.jobs import ArtifactInfo, JobStatus, Notify, Progress, Tracking
from app_common.public import JobPublic, JobUrls
from app_common.spec import FieldError, JobSpec

__all__ = [
    "ArtifactInfo",
    "ArtifactPublic",
    "Catalog",
    "DatasetCreate",
    "DatasetList",
    "DatasetPublic",
    "DatasetStatus",
    "DatasetUrls",
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
    "PresignedPostInfo",
    "Progress",
    "UploadInfo",
]

class JobCreate(JobSpec):
    """The request body of POST /api/v1/jobs: the job spec itself, plus the service's options
    ``notify`` and ``tracking``, which are stored with the job but are not engine configuration
    (they are not part of the spec, nor of its fingerprint)."""

    notify: Notify | None = None
    tracking: Tracking | None = None

    def job_spec(self) -> JobSpec:
        """The engine's spec: the body without the service options (fields set stay set)."""
        return JobSpec.model_validate(self.model_dump(exclude={"notify", "tracking"}, exclude_unset=True))


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


class JobList(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last.")


class JobMetrics(BaseModel):
    megabatches: list[dict[str, Any]] = Field(description="One point per finished megabatch, in order.")
    epochs: list[dict[str, Any]] = Field(description="One point per finished epoch, by (megabatch, epoch).")


class DatasetCreate(BaseModel):
    """Announce an upload: what the file is and exactly what will be sent."""

    model_config = ConfigDict(extra="forbid")

    format: DatasetFormat = Field(
        description="The loader that reads it: npz (an .npz file), cifar10/cifar100 (a .tar.gz or .zip of the "
        "python-version folder), imagefolder (a .zip or .tar.gz of class folders)."
    )
    name: str = Field(min_length=1, max_length=200, description="A label for people; not unique.")
    sha256: str = Field(pattern=SHA256_PATTERN, description="Of the whole file, lowercase hex.")
    bytes: int = Field(ge=1, description="Size of the file; at most limits.max_dataset_bytes of the catalog.")


class DatasetUrls(BaseModel):
    self: str
    content: str = Field(description="PUT the file's bytes here (streamed through the API).")
    complete: str = Field(description="POST here after a presigned upload straight to the store.")


class PresignedPostInfo(BaseModel):
    """An upload straight to the object store: POST ``url`` as multipart/form-data, the ``fields``
    first and the file last (field name ``file``); the store refuses more than the declared bytes."""

    url: str
    fields: dict[str, str]
    expires_at: datetime


class UploadInfo(BaseModel):
    put_url: str = Field(description="Absolute URL of the streamed PUT through the API (always available).")
    post: PresignedPostInfo | None = Field(
        description="A presigned POST to the object store (then POST urls.complete); null when the server "
        "stores files itself."
    )


class DatasetPublic(DatasetState):
    """A dataset as its owner sees it: the stored record without the owner, with links and, while
    it is ``uploading``, how to upload."""

    urls: DatasetUrls
    upload: UploadInfo | None = Field(description="How to send the file; null unless the status is uploading.")

    @classmethod
    def from_record(cls, record: DatasetRecord, *, urls: DatasetUrls, upload: UploadInfo | None) -> DatasetPublic:
        fields: dict[str, Any] = {name: getattr(record, name) for name in DatasetState.model_fields}
        return cls.model_validate(fields | {"urls": urls, "upload": upload})


class DatasetList(BaseModel):
    items: list[DatasetPublic]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last.")


class Limits(BaseModel):
    max_epochs: int
    max_megabatches: int
    max_concurrent_jobs_per_key: int
    max_body_bytes: int
    download_url_ttl_s: int
    max_dataset_bytes: int


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
