"""Errors by kind: what the caller should do about a failed run.

A :class:`RunInputError` means the run's input is wrong (the spec, the dataset, a checkpoint that
belongs to another run or is damaged): running it again gives the same failure, so the service
fails such a job at once, with the message as the reason. Any other exception is treated as
transient (a lost device, an out-of-memory kill, a bug triggered by timing) and may be retried.
"""

from __future__ import annotations


class RunInputError(ValueError):
    """The run cannot proceed with this input; the message says what is wrong in one line."""


class SpecInputError(RunInputError):
    """The spec asks for something this engine cannot do (beyond what the schema checks)."""


class TrainingDiverged(RunInputError):
    """The loss became NaN or infinite. Runs are deterministic, so a retry diverges the same way:
    the settings (usually ``training.lr``) must change."""
