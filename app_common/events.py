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
class MegabatchEnded:
    megabatch: int  # 1-based
    megabatches: int
    metrics: dict[str, Any]  # one entry of result.json's "megabatches" list
    type: str = field(default="megabatch_ended", init=False)


@dataclass(frozen=True)
class CheckpointWritten:
    megabatch: int
    path: str
    type: str = field(default="checkpoint_written", init=False)


@dataclass(frozen=True)
class RunEnded:
    cer: int
    final_test_accuracy: float
    final_density: float
    stopped: bool = False  # True when a callback stopped the run early
    type: str = field(default="run_ended", init=False)


@dataclass(frozen=True)
class StatusChanged:
    """Emitted by the service (not the engine) when a job's status changes."""

    status: str
    reason: str | None = None
    type: str = field(default="status_changed", init=False)


Event = RunStarted | Pruned | EpochEnded | MegabatchEnded | CheckpointWritten | RunEnded | StatusChanged

EVENT_TYPES: dict[str, type] = {
    cls.type: cls  # type: ignore[attr-defined]
    for cls in (RunStarted, Pruned, EpochEnded, MegabatchEnded, CheckpointWritten, RunEnded, StatusChanged)
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
    return cls(**{k: v for k, v in data.items() if k in names})
