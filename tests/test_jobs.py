"""app_common/jobs.py: the job record's fields and the progress arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from factories import epoch_ended, megabatch_ended
from pydantic import TypeAdapter

from app_common.events import CheckpointWritten, Pruned, RunStarted, StatusChanged
from app_common.jobs import DERIVED_FIELDS, JOB_FIELDS, JobRecord, Progress, Timestamp, progress_after

START = Progress(megabatch=0, megabatches=4, epoch=0, epochs=5, fraction=0.0)


def test_job_fields_are_the_models_but_the_derived_ones() -> None:
    assert JOB_FIELDS == tuple(name for name in JobRecord.model_fields if name not in DERIVED_FIELDS)
    assert {"id", "owner", "spec", "status", "progress", "artifacts", "cancel_requested", "heartbeat_at",
            "events_lost"} <= set(JOB_FIELDS)
    # Staleness depends on the lease, read with the record: never stored.
    assert DERIVED_FIELDS == {"stale"} and "stale" in JobRecord.model_fields


def test_initial_progress_from_the_spec() -> None:
    assert Progress.initial({"stream": {"megabatches": 4}, "training": {"epochs": 5}}) == START
    assert Progress.initial({}) == Progress(megabatch=0, megabatches=None, epoch=0, epochs=None, fraction=0.0)


def test_run_started_and_resumed() -> None:
    assert progress_after(START, RunStarted(megabatches=4, epochs=5)) == START
    resumed = progress_after(START, RunStarted(megabatches=4, epochs=5, resumed_after=1))
    assert resumed == Progress(megabatch=1, megabatches=4, epoch=0, epochs=5, fraction=0.25)


def test_epochs_and_megabatches() -> None:
    p = progress_after(START, epoch_ended(2, 2, epochs=5))
    # Megabatch 1 done, megabatch 2 two fifths done, of four: (1 + 2/5) / 4.
    assert p == Progress(megabatch=2, megabatches=4, epoch=2, epochs=5, fraction=0.35)
    p = progress_after(p, megabatch_ended(2, 4))
    assert p == Progress(megabatch=2, megabatches=4, epoch=5, epochs=5, fraction=0.5)
    assert progress_after(p, megabatch_ended(4, 4)).fraction == 1.0


def test_fraction_is_clamped_and_rounded() -> None:
    assert progress_after(START, epoch_ended(9, 5, epochs=5)).fraction == 1.0
    third = progress_after(Progress(megabatch=0, megabatches=3, epoch=0, epochs=1, fraction=0.0), megabatch_ended(1, 3))
    assert third.fraction == pytest.approx(1 / 3) and third.fraction == round(1 / 3, 6)


@pytest.mark.parametrize(
    "event",
    [Pruned(megabatch=1, target_density=0.8, density=0.8, pruner="snip"), CheckpointWritten(megabatch=1, path="x"),
     StatusChanged(status="running")],
)
def test_other_events_change_nothing(event: object) -> None:
    assert progress_after(START, event) is START  # type: ignore[arg-type]


def test_times_are_shown_to_the_millisecond_in_utc() -> None:
    """The store keeps milliseconds; JSON shows exactly those (not six digits), always in UTC."""
    as_json = TypeAdapter(Timestamp).dump_python
    assert as_json(datetime(2026, 11, 30, 23, 33, 1, 123000, tzinfo=UTC), mode="json") == "2026-11-30T23:33:01.123Z"
    plus_one = timezone(timedelta(hours=1))
    assert as_json(datetime(2026, 12, 1, 0, 33, 1, 123456, tzinfo=plus_one), mode="json") == "2026-11-30T23:33:01.123Z"
    assert isinstance(as_json(datetime(2026, 1, 1, tzinfo=UTC)), datetime)  # Python mode keeps the datetime
