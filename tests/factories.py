"""Typed engine events for service tests: what the engine would emit, with small defaults."""

from __future__ import annotations

from typing import Any

from app_common.events import EpochEnded, MegabatchEnded, MegabatchMetrics


def epoch_ended(m: int, e: int, epochs: int = 5, loss: float = 1.0) -> EpochEnded:
    return EpochEnded(megabatch=m, epoch=e, epochs=epochs, lr=0.1, train_loss=loss, train_accuracy=0.5,
                      val_accuracy=0.4)


def megabatch_metrics(m: int, **values: Any) -> MegabatchMetrics:
    """Metrics of megabatch ``m``: zeros except ``values``."""
    base: dict[str, Any] = {
        "index": m, "train_samples": 0, "val_samples": 0, "target_density": 1.0, "density": 1.0, "layer_density": {},
        "nonzero_params": 0, "prunable_params": 0, "test_accuracy": 0.0, "test_errors": 0, "test_total": 0,
        "val_accuracy": 0.0, "train_accuracy": 0.0, "generalization_gap": 0.0, "generalization_gap_last": 0.0,
        "selected_epoch": 1, "train_loss": 0.0, "wall_time_s": 0.0, "train_time_s": 0.0, "images_per_s": 0.0,
        "epochs": 1,
    }
    return MegabatchMetrics(**(base | values))


def megabatch_ended(m: int, total: int = 4, **values: Any) -> MegabatchEnded:
    return MegabatchEnded(megabatch=m, megabatches=total, metrics=megabatch_metrics(m, **values))


def stored_metrics(m: int, **values: Any) -> dict[str, Any]:
    """What the store keeps for megabatch ``m`` (history point, ``latest_metrics``)."""
    return megabatch_metrics(m, **values).to_dict() | {"megabatch": m}
