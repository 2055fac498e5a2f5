"""The job record: what the store keeps about one job, typed.

:class:`JobRecord` is the one shape of a job inside the service: the store writes and returns it,
the worker moves it through its lifecycle, and the API's public schema is derived from it
(:class:`app_common.public.JobPublic` drops ``owner`` and adds links). :func:`progress_after` is the pure
arithmetic behind ``JobRecord.progress``: how far a run is after an engine event.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, field_validator

from app_common.events import STATUSES, TERMINAL_STATUSES, EpochEnded, Event, MegabatchEnded, RunStarted


def _iso_ms(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# A UTC time as the store keeps it, to the millisecond: ``2026-11-30T23:33:01.123Z`` in JSON
# (pydantic would otherwise print microseconds the store never had).
Timestamp = Annotated[datetime, PlainSerializer(_iso_ms, return_type=str, when_used="json")]

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
if get_args(JobStatus) != STATUSES:  # one list of statuses, checked at import
    raise RuntimeError("app_common.jobs.JobStatus and app_common.events.STATUSES disagree")


class Progress(BaseModel):
    model_config = ConfigDict(frozen=True)

    megabatch: int = Field(description="Megabatches done (or in progress), 1-based; 0 before the first.")
    megabatches: int | None
    epoch: int
    epochs: int | None
    fraction: float = Field(ge=0.0, le=1.0, description="Share of the whole run done.")

    @classmethod
    def initial(cls, spec: dict[str, Any]) -> Progress:
        """Nothing done yet; the totals come from the spec as submitted (None when it omits them)."""
        stream = spec.get("stream") or {}
        training = spec.get("training") or {}
        return cls(megabatch=0, megabatches=stream.get("megabatches"), epoch=0, epochs=training.get("epochs"),
                   fraction=0.0)


class ArtifactInfo(BaseModel):
    """One file of a finished job, as the worker listed it (name relative to the job folder)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    format: str
    bytes: int
    sha256: str


# --- service options: stored with the job, not part of the engine's JobSpec (nor its fingerprint) --
WebhookEvent = Literal["started", "megabatch", "completed"]
WEBHOOK_EVENTS: tuple[str, ...] = get_args(WebhookEvent)
DEFAULT_MLFLOW_EXPERIMENT = "anytime-prune"


def _default_events() -> list[WebhookEvent]:
    return ["completed"]


class Notify(BaseModel):
    """Where and when to deliver the job's webhooks (signed with the API key's secret)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(
        min_length=1, max_length=2048,
        description="An http:// or https:// URL that receives a POST per event (Standard Webhooks). Addresses "
        "that resolve to loopback, private or link-local networks are refused unless the server allows them.",
    )
    events: list[WebhookEvent] = Field(
        default_factory=_default_events, min_length=1, max_length=len(WEBHOOK_EVENTS),
        description="started: the job started running; megabatch: each megabatch finished; completed: the job "
        "ended (succeeded, failed or cancelled).",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        try:
            parts = urlsplit(url)
            port = parts.port  # raises on a malformed port
        except ValueError as exc:
            raise ValueError(f"not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError("must start with http:// or https://")
        if not parts.hostname:
            raise ValueError("has no host name")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not contain credentials")
        if port == 0:
            raise ValueError("port 0 is not a port")
        if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
            raise ValueError("must not contain spaces or control characters")
        return url

    @field_validator("events")
    @classmethod
    def _unique(cls, events: list[str]) -> list[str]:
        if len(set(events)) != len(events):
            raise ValueError("lists an event twice")
        return events


class Tracking(BaseModel):
    """Experiment tracking of the job (MLflow, when the workers have MLFLOW_TRACKING_URI)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mlflow_experiment: str = Field(
        default=DEFAULT_MLFLOW_EXPERIMENT, min_length=1, max_length=500, pattern=r"^[^\x00-\x1f\x7f]+$",
        description="The MLflow experiment the job's run goes to (created when missing).",
    )


class MlflowRun(BaseModel):
    """The MLflow run that tracks a job (set by the worker once the run exists)."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    experiment_id: str
    url: str | None = Field(default=None, description="The run's page in the MLflow UI, when the server has one.")


SpecT = TypeVar("SpecT")


class JobState(BaseModel, Generic[SpecT]):
    """A job's state without its owner: what the API shows (with ``spec`` a validated JobSpec)
    and the store keeps (with ``spec`` as submitted, see :class:`JobRecord`)."""

    model_config = ConfigDict(frozen=True)

    id: str
    status: JobStatus
    queue: str
    spec: SpecT
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    updated_at: Timestamp
    error: str | None
    attempt: int
    progress: Progress
    # The last megabatch_ended event's metrics with its ``megabatch`` number (the wire format of
    # app_common.events.MegabatchMetrics), and the engine's result.json.
    latest_metrics: dict[str, Any] | None
    result: dict[str, Any] | None
    artifacts: list[ArtifactInfo]
    cancel_requested: bool
    notify: Notify | None = Field(default=None, description="The job's webhooks, as submitted; null when none.")
    tracking: Tracking | None = Field(default=None, description="Experiment tracking, as submitted; null when none.")
    mlflow: MlflowRun | None = Field(default=None, description="The job's MLflow run, once a worker created it.")
    heartbeat_at: Timestamp | None = Field(
        default=None, description="When the worker running the job last renewed its lease (every lease TTL / 3)."
    )
    events_lost: int = Field(
        default=0,
        ge=0,
        description="Progress events the worker had to drop while Redis was unreachable for long (its buffer "
        "was full); 0 when the event stream and the per-epoch history are complete.",
    )
    # Derived when read, never stored: see app_common.store.leases.LeaseOps.with_staleness.
    stale: bool = Field(
        default=False,
        description="True while a running or cancelling job has no live lease: its worker is gone and no "
        "other worker has resumed it yet (a flag, not a status).",
    )

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class JobRecord(JobState[dict[str, Any]]):
    """A job as stored: each field is one field of the Redis hash ``{prefix}:job:{id}``.

    ``spec`` is the dict as submitted, not a JobSpec: a record must still load when its spec no
    longer validates (written by another version); the worker validates it and fails the job
    naming the bad field.
    """

    owner: str


# Fields computed when a record is read, not kept in the hash.
DERIVED_FIELDS = frozenset({"stale"})

# The hash fields, in the model's order (the store reads and writes exactly these).
JOB_FIELDS: tuple[str, ...] = tuple(name for name in JobRecord.model_fields if name not in DERIVED_FIELDS)

# Events that move a job's progress.
PROGRESS_EVENTS = (RunStarted, EpochEnded, MegabatchEnded)


def progress_after(progress: Progress, event: Event) -> Progress:
    """``progress`` after ``event``; events other than :data:`PROGRESS_EVENTS` change nothing.

    With ``M`` megabatches of ``E`` epochs, epoch ``e`` of megabatch ``m`` (both 1-based) ends at
    fraction ``((m - 1) + e / E) / M``; a resumed run starts at ``resumed_after / M``. Fractions
    are clamped to [0, 1] and rounded to 6 digits.
    """
    if isinstance(event, RunStarted):
        total = event.megabatches or progress.megabatches or 1
        done = event.resumed_after or 0
        new = Progress(megabatch=done, megabatches=total, epoch=0, epochs=event.epochs, fraction=_clamp(done / total))
    elif isinstance(event, EpochEnded):
        m, e = event.megabatch, event.epoch
        epochs = event.epochs or progress.epochs or e
        total = progress.megabatches or m
        new = progress.model_copy(
            update={"megabatch": m, "epoch": e, "epochs": epochs, "fraction": _clamp(((m - 1) + e / epochs) / total)}
        )
    elif isinstance(event, MegabatchEnded):
        m = event.megabatch
        total = event.megabatches or progress.megabatches or m
        new = progress.model_copy(
            update={"megabatch": m, "megabatches": total, "epoch": progress.epochs or 0, "fraction": _clamp(m / total)}
        )
    else:
        return progress
    return new


def _clamp(fraction: float) -> float:
    return round(min(1.0, max(0.0, float(fraction))), 6)
