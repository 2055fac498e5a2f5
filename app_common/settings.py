"""Service settings: one typed object, built once at the edge (process start) and injected.

Every variable is read from the environment with the prefix ``APP_`` (``APP_MAX_EPOCHS=50``),
except the Redis URL, which is the conventional ``REDIS_URL``. Defaults live here and nowhere else.
Torch-free: the API, the worker and the CLI all import this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app_common.storage import Storage, open_storage
from app_common.tasks import QUEUE_NAMES

# Celery queue names: spec device ``cuda`` goes to ``gpu``, ``cpu`` to ``cpu``, ``auto`` to the
# configured default queue.


class Settings(BaseSettings):
    """Everything the API and the worker need to know about their environment."""

    model_config = SettingsConfigDict(env_prefix="APP_", frozen=True, extra="ignore")

    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL", "APP_REDIS_URL", "redis_url"),
        description="redis://host:port/db; None means the serve command starts an embedded Redis.",
    )
    redis_prefix: str = Field("app", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    redis_timeout_s: float = Field(
        1.0, gt=0.0, le=60.0, description="Connect and read timeout of Redis calls: fail fast, answer 503."
    )
    artifacts_dir: Path = Field(
        Path("./runs/artifacts"),
        description="A worker's local work folder: {artifacts_dir}/{job_id}/ is a job's out_dir.",
    )
    data_dir: Path = Field(Path("./data"), description="Root under which a spec's dataset.path is resolved.")
    storage_url: str | None = Field(
        None,
        description="s3://bucket/prefix for an S3-compatible object store (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_REGION configure it); unset: files live in storage_dir (one host).",
    )
    storage_dir: Path = Field(
        Path("./runs/storage"), description="The object store's folder when storage_url is unset."
    )
    storage_public_url: str | None = Field(
        None, description="The object store's address as clients reach it, when it differs from the workers' "
        "(presigned links are signed for it)."
    )
    cache_dir: Path = Field(Path("./runs/cache"), description="A worker's local copies of datasets, by sha256.")
    cache_max_bytes: int = Field(
        20 * 2**30, ge=0,
        description="Worker cache limit: least recently used downloaded datasets and decoded image caches are "
        "evicted past this (never one a running job reads).",
    )
    max_dataset_bytes: int = Field(2 * 2**30, ge=1, description="Largest dataset upload accepted.")
    max_dataset_extracted_bytes: int = Field(
        8 * 2**30, ge=1, description="Largest total size an uploaded archive (or .npz) may unpack to."
    )
    max_dataset_members: int = Field(200_000, ge=1, description="Most files an uploaded archive (or .npz) may hold.")
    signing_secret: str | None = Field(
        None,
        repr=False,
        description="HMAC key of artifact download links; the serve command generates one if unset."
    )
    auth_enabled: bool = True
    max_epochs: int = Field(200, ge=1)
    max_megabatches: int = Field(100, ge=1)
    max_concurrent_jobs_per_key: int = Field(8, ge=1)
    max_body_bytes: int = Field(65536, ge=1024)
    download_url_ttl_s: int = Field(3600, ge=1)
    job_lease_ttl_s: int = Field(30, ge=1)
    max_attempts: int = Field(3, ge=1)
    events_maxlen: int = Field(10000, ge=100)
    public_base_url: str | None = Field(None, description="Base of absolute URLs; None: taken from the request.")
    default_queue: str = Field("cpu", description="Queue of jobs whose spec says device 'auto'.")
    queues: Annotated[tuple[str, ...], NoDecode] = Field(
        ("cpu",),
        description="Queues that have workers (APP_QUEUES=cpu,gpu). Device 'cuda' is accepted only "
        "when 'gpu' is listed.",
    )
    # Celery's Redis transport redelivers a message that was not acked within this many seconds;
    # it must exceed the longest job (acks late), so the default is a day.
    visibility_timeout_s: int = Field(86400, ge=60)
    cancel_grace_s: float = Field(
        300.0,
        gt=0.0,
        description="A cancelling job still running this long after its worker saw the flag is terminated.",
    )
    celery_key_prefix: str = Field(
        "",
        max_length=128,
        description="Prefix of Celery's Redis keys (kombu global_keyprefix); lets several deployments "
        "or test runs share one Redis without taking each other's messages.",
    )
    idempotency_ttl_s: int = Field(86400, ge=1, description="How long an Idempotency-Key is remembered.")
    worker_nice: int = Field(
        0, ge=0, le=19, description="Niceness a worker runs at (serve sets 10, so the API answers promptly while "
        "a job trains on the same machine)."
    )
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads for training (OMP_NUM_THREADS of the job's process); unset: "
        "torch's default (serve leaves one core to the API)."
    )
    sse_heartbeat_s: float = Field(10.0, gt=0.0, description="Comment line sent on an idle event stream.")
    submit_rate_limit: str | None = Field(
        "30/minute",
        pattern=r"^\s*$|^[0-9]+\s*(/|per)\s*([0-9]+\s*)?(second|minute|hour|day)s?$",
        description="Job submissions one API key may make in a moving window ('30/minute', '100 per hour'); "
        "over it: 429 with Retry-After. Empty: no limit.",
    )
    dispatch_interval_s: float = Field(
        0.5, gt=0.0, le=60.0, description="How often an idle training worker looks for the next queued job."
    )
    max_streams_per_key: int = Field(
        16, ge=1, description="Open event streams one API key may hold, all API processes together (more: 429)."
    )
    sse_redis_connections: int = Field(
        64, ge=1, description="Redis connections the event streams of one API process share (a bounded pool)."
    )
    webhook_allow_private: bool = Field(
        False, description="Allow webhook URLs that resolve to loopback, private, link-local or reserved addresses "
        "(tests, on-premises receivers). Off: such URLs are refused at submit and again at delivery."
    )
    webhook_timeout_s: float = Field(10.0, gt=0.0, le=120.0, description="Timeout of one webhook delivery attempt.")
    webhook_resolve_timeout_s: float = Field(
        2.0, gt=0.0, le=30.0, description="Longest wait for the name resolution of a webhook URL's host."
    )
    webhook_retry_base_s: float = Field(
        5.0, gt=0.0, description="Wait before the second delivery attempt; it doubles after each failed attempt."
    )
    webhook_retry_max_s: float = Field(600.0, gt=0.0, description="Longest wait between two delivery attempts.")
    webhook_max_attempts: int = Field(
        13, ge=1, le=100, description="Delivery attempts before a webhook is given up (defaults: about an hour)."
    )
    webhook_concurrency: int = Field(
        8, ge=1, le=256, description="Deliveries one control worker makes at the same time."
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "APP_MLFLOW_TRACKING_URI", "mlflow_tracking_uri"),
        repr=False,  # may carry credentials
        description="Workers: the MLflow tracking server each job is logged to as a run (needs the mlflow "
        "extra); unset: no tracking.",
    )
    mlflow_public_url: str | None = Field(
        None, description="The MLflow UI's address as users reach it, for the run links in job records; unset: "
        "the tracking URI when it is http(s)."
    )
    mlflow_queue_limit: int = Field(
        1000, ge=1, le=1_000_000,
        description="Workers: metric updates (one epoch's or one megabatch's) a job may have waiting for a slow "
        "MLflow server; past it the oldest per-epoch ones are dropped (and logged from result.json at the end).",
    )
    mlflow_drain_timeout_s: float = Field(
        60.0, ge=0, le=3600,
        description="Workers: how long the end of a job waits for its MLflow updates to be sent and its run "
        "ended; past it the job goes on with a warning.",
    )

    @field_validator("queues", mode="before")
    @classmethod
    def _split_queues(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(q.strip() for q in value.split(",") if q.strip())
        return value

    @field_validator("queues")
    @classmethod
    def _known_queues(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [q for q in value if q not in QUEUE_NAMES]
        if unknown or not value:
            raise ValueError(f"queues must be a non-empty subset of {QUEUE_NAMES}, got {value}")
        return value

    @field_validator("public_base_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _default_queue_served(self) -> Settings:
        if self.default_queue not in self.queues:
            raise ValueError(f"default_queue {self.default_queue!r} is not one of queues {self.queues}")
        return self

    def open_storage(self) -> Storage:
        """The object store these settings name (see :func:`app_common.storage.open_storage`)."""
        return open_storage(self.storage_url, local_dir=self.storage_dir, public_url=self.storage_public_url)

    def queue_for_device(self, device: str) -> str | None:
        """The Celery queue for a spec's ``training.device``; None when no worker serves it."""
        queue = {"cuda": "gpu", "cpu": "cpu"}.get(device, self.default_queue)
        return queue if queue in self.queues else None

    def celery_transport_options(self) -> dict[str, Any]:
        """Celery ``broker_transport_options``, the same for the API (producer) and the worker
        (consumer): the queue keys must agree, and an unacked message is redelivered only after
        the visibility timeout, which must exceed the longest job (acks late)."""
        options: dict[str, Any] = {"visibility_timeout": self.visibility_timeout_s}
        if self.celery_key_prefix:
            options["global_keyprefix"] = self.celery_key_prefix
        return options
