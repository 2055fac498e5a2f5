"""Events and job statuses: what the engine emits, the worker stores and the API serves.

Events are past-tense frozen dataclasses. On the wire (Redis stream, Server-Sent Events, JSON
lines) an event is ``{"type": <snake_case name>, ...fields}``; :func:`event_to_dict` and
:func:`event_from_dict` are the only translation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Job statuses. Terminal statuses never change again.
QUEUED = "queued"
RUNNING = "running"
CANCELLING = "cancelling"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
STATUSES = (QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL_STATUSES = frozenset({SUCCEEDED, FAILED, CANCELLED})


@dataclass(frozen=True)
class RunStarted:
    megabatches: int
    epochs: int
    resumed_after: int = 0  # megabatches already done when this run (re)started
    device: str = "cpu"
    precision: str = "fp32"
    type: str = field(default="run_started", init=False)


@dataclass(frozen=True)
class Pruned:
    megabatch: int  # 1-based
    target_density: float
    density: float  # measured over the prunable weights
    pruner: str
    type: str = field(default="pruned", init=False)


@dataclass(frozen=True)
class EpochEnded:
    megabatch: int  # 1-based
    epoch: int  # 1-based
    epochs: int
    lr: float
    train_loss: float
    train_accuracy: float
    val_accuracy: float
    type: str = field(default="epoch_ended", init=False)


@dataclass(frozen=True)
class MegabatchMetrics:
    """What was measured after one megabatch: one entry of result.json's ``megabatches`` list,
    the ``metrics`` of a :class:`MegabatchEnded` event and a point of the API's metric history.

    Densities are fractions of the prunable weights kept; generalisation gaps are in percentage
    points (train accuracy minus validation accuracy, APP_SPEC section 3).
    """

    index: int  # 1-based megabatch number
    train_samples: int
    val_samples: int
    target_density: float  # the schedule's density for this megabatch (1.0 for dense)
    density: float  # measured over the prunable weights
    layer_density: dict[str, float]  # prunable parameter name -> density
    nonzero_params: int  # over all parameters, pruned or not
    prunable_params: int
    test_accuracy: float
    test_errors: int
    test_total: int
    val_accuracy: float
    train_accuracy: float  # running accuracy over the selected epoch's augmented batches
    generalization_gap: float  # of the selected (best-validation) epoch, the reference's definition
    generalization_gap_last: float  # of the last epoch, as the reference logged it
    selected_epoch: int  # 1-based; its weights were restored
    train_loss: float
    wall_time_s: float
    train_time_s: float
    images_per_s: float
    epochs: list[dict[str, Any]]  # per epoch: epoch, lr, train_loss, train_accuracy, val_accuracy
    # Eval mode, no augmentation, a fixed subset of the training data; None when not measured.
    train_accuracy_clean: float | None = None
    generalization_gap_clean: float | None = None
    # The most GPU memory tensors held at once during this megabatch (pruning, training,
    # measuring), in bytes; None on a CPU and in records written before it was measured.
    peak_gpu_memory_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MegabatchMetrics:
        """Read one entry; keys this version does not know (a newer writer) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class MegabatchEnded:
    megabatch: int  # 1-based
    megabatches: int
    metrics: MegabatchMetrics
    type: str = field(default="megabatch_ended", init=False)


@dataclass(frozen=True)
class CheckpointWritten:
    megabatch: int
    path: str  # relative to the run folder (``checkpoints/megabatch-0003.pt``): no host's layout
    type: str = field(default="checkpoint_written", init=False)


@dataclass(frozen=True)
class ModelWritten:
    """The model of a megabatch was kept (``export.keep_every_megabatch``): ``name`` is the model
    file and ``files`` every file written for it (``{name, format, bytes, sha256}``: the model,
    then its manifest), names relative to the run folder (``megabatch-0003/...``)."""

    megabatch: int
    name: str
    bytes: int
    sha256: str
    density: float
    target_density: float
    test_accuracy: float
    files: list[dict[str, Any]]
    type: str = field(default="model_written", init=False)


@dataclass(frozen=True)
class RunEnded:
    cer: int
    final_test_accuracy: float
    final_density: float
    stopped: bool = False  # True when a callback stopped the run early
    type: str = field(default="run_ended", init=False)


@dataclass(frozen=True)
class WarningIssued:
    """Emitted by the service (not the engine): something beside the run went wrong and the job
    goes on without it (``source`` names what: ``"mlflow"`` when experiment tracking stopped)."""

    source: str
    message: str
    type: str = field(default="warning", init=False)


@dataclass(frozen=True)
class StatusChanged:
    """Emitted by the service (not the engine) when a job's status changes."""

    status: str
    reason: str | None = None
    type: str = field(default="status_changed", init=False)


Event = (
    RunStarted | Pruned | EpochEnded | MegabatchEnded | CheckpointWritten | ModelWritten | RunEnded | StatusChanged
    | WarningIssued
)

EVENT_TYPES: dict[str, type] = {
    cls.type: cls
    for cls in (
        RunStarted, Pruned, EpochEnded, MegabatchEnded, CheckpointWritten, ModelWritten, RunEnded, StatusChanged,
        WarningIssued,
    )
}
# dataclass defaults of init=False fields are class attributes, so ``cls.type`` is the name above.


def event_to_dict(event: Event) -> dict[str, Any]:
    return dataclasses.asdict(event)


def event_from_dict(data: dict[str, Any]) -> Event:
    kind = data.get("type")
    cls = EVENT_TYPES.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown event type {kind!r}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {k: v for k, v in data.items() if k in names}
    if cls is MegabatchEnded and isinstance(values.get("metrics"), dict):
        values["metrics"] = MegabatchMetrics.from_dict(values["metrics"])
    event: Event = cls(**values)
    return event
