"""The service sub-commands' wiring (anytime_prune.service_cli and the modules it joins): the
verbs exist with their flags, and the name lists agree with the settings and the job statuses."""

from __future__ import annotations

import argparse
import logging

import pytest

from anytime_prune.cli import build_parser
from anytime_prune.client import JobEvent
from anytime_prune.client_cli import EventProgress, latest_metrics
from anytime_prune.engine_cli import megabatch_table
from app_common.events import (
    STATUSES,
    MegabatchEnded,
    MegabatchMetrics,
    RunStarted,
    StatusChanged,
    event_to_dict,
)
from app_common.tasks import QUEUE_NAMES


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_verb_is_wired_in_help_order() -> None:
    names = list(subcommands(build_parser()))
    assert names == ["run", "compare", "build-restricted-imagenet", "serve", "api", "worker", "keys",
                     "submit", "status", "watch", "list", "cancel", "download", "datasets", "webhooks"]


def test_queue_choices_are_the_task_contracts_queues() -> None:
    for name in QUEUE_NAMES:
        for argv in (["serve", "--queue", name], ["worker", "--queue", name]):
            assert build_parser().parse_args(argv).queue == name
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--queue", "tpu"])


@pytest.mark.parametrize("status", STATUSES)
def test_list_accepts_every_job_status(status: str) -> None:
    assert build_parser().parse_args(["list", "--status", status]).status == status
    with pytest.raises(SystemExit):
        build_parser().parse_args(["list", "--status", "sleeping"])


# --- the client verbs read typed metrics --------------------------------------------------------


def metrics(index: int, acc: float) -> MegabatchMetrics:
    return MegabatchMetrics(
        index=index, train_samples=100, val_samples=10, target_density=0.8, density=0.8, layer_density={"w": 0.8},
        nonzero_params=80, prunable_params=100, test_accuracy=acc, test_errors=3, test_total=10, val_accuracy=0.7,
        train_accuracy=0.9, generalization_gap=20.0, generalization_gap_last=21.0, selected_epoch=1, train_loss=0.3,
        wall_time_s=1.0, train_time_s=0.8, images_per_s=125.0, epochs=1,
    )


def test_event_progress_shows_status_and_megabatch_lines(caplog: pytest.LogCaptureFixture) -> None:
    wire = [
        ("1-0", StatusChanged("running")),
        ("2-0", RunStarted(megabatches=2, epochs=1)),
        ("3-0", MegabatchEnded(megabatch=1, megabatches=2, metrics=metrics(1, 0.6543))),
        ("4-0", StatusChanged("failed", reason="boom")),
    ]
    progress = EventProgress("[j] ")
    with caplog.at_level(logging.INFO, logger="anytime_prune"):
        for sse_id, event in wire:
            progress(JobEvent(sse_id, event.type, event_to_dict(event)))
        progress(JobEvent("5-0", "megabatch_ended", {"metrics": {"index": 1}}))  # unreadable: skipped
        progress(JobEvent("6-0", "something_new", {"x": 1}))  # a newer server's event: skipped
    assert caplog.messages[0] == "[j] status: running"
    assert "[j] megabatch 1/2: test acc 0.6543, density 0.8000, gap +20.00 pp" in caplog.messages
    assert caplog.messages[-1] == "[j] status: failed (boom)"


def test_status_table_and_list_read_metrics_through_the_type() -> None:
    assert latest_metrics({"latest_metrics": {**metrics(2, 0.5).to_dict(), "megabatch": 2}}) == metrics(2, 0.5)
    assert latest_metrics({"latest_metrics": None}) is None
    assert latest_metrics({"id": "x", "latest_metrics": {"test_accuracy": 0.5}}) is None  # an incomplete record
    result = {"megabatches": [metrics(1, 0.5).to_dict(), metrics(2, 0.75).to_dict()], "cer": 6,
              "cer_normalized": 0.3, "final_test_accuracy": 0.75, "final_density": 0.8}
    table = megabatch_table(result).splitlines()
    assert table[2].split()[:4] == ["1", "0.8000", "0.8000", "0.5000"]
    assert table[3].split()[3] == "0.7500" and table[-1].startswith("CER 6 errors")


# --- the README's commands are real ------------------------------------------------------------


def readme_commands() -> list[list[str]]:
    """Every ``anytime-prune ...`` command in the README's bash blocks (also inside ``$(...)``
    and after ``VAR=value`` prefixes), with shell variables replaced by a dataset/job-like id."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" # ")[0].split("  #")[0]
            for match in re.finditer(r"(?:^|\$\(|&& |\s)anytime-prune (.*?)(?:\)|$)", line):
                argv = shlex.split(re.sub(r"\$\w+", "ab" * 16, match.group(1)))
                commands.append(argv)
    return commands


def test_the_readmes_commands_parse() -> None:
    commands = readme_commands()
    verbs = {argv[0] for argv in commands}
    assert {"datasets", "submit", "worker", "keys", "run"} <= verbs, verbs
    assert any(argv[:2] == ["datasets", "upload"] for argv in commands)
    assert any("--dataset-id" in argv for argv in commands)
    for argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"the README runs `anytime-prune {' '.join(argv)}`, which does not parse") from exc


# --- tables -------------------------------------------------------------------------------------


def test_list_prints_aligned_columns_whatever_the_widths(capsys: pytest.CaptureFixture[str]) -> None:
    """Every column starts at the same place on every line (a 27-character timestamp in a
    24-character column shifted the rest of the line)."""
    from anytime_prune.client_cli import cmd_list

    jobs = [
        {"id": "a" * 32, "status": "succeeded", "created_at": "2026-11-30T23:33:01.123Z", "progress": {"fraction": 1},
         "spec": {"dataset": {"name": "imagefolder"}, "architecture": "resnet20_a", "method": "dense"},
         "latest_metrics": {**metrics(2, 0.9).to_dict(), "megabatch": 2}},
        {"id": "b" * 32, "status": "queued", "created_at": "2026-11-30T23:34:00.000Z", "progress": {"fraction": 0},
         "spec": {"dataset": {"name": "digits"}, "architecture": "mlp", "method": "app"}, "latest_metrics": None},
    ]

    class FakeClient:
        def list(self, status: str | None = None, limit: int = 20) -> list[dict[str, object]]:
            return jobs

    args = build_parser().parse_args(["list"])
    assert cmd_list(args, FakeClient()) == 0  # type: ignore[arg-type]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    header = lines[0]
    for column in ("status", "created (UTC)", "spec"):  # left-aligned: every cell starts under its name
        start = header.index(column)
        assert all(line[start - 2 : start] == "  " and line[start] != " " for line in lines[1:]), (column, lines)
    end = header.index("progress") + len("progress")  # right-aligned: every cell ends under its name
    assert all(line[end - 1] == "%" and line[end] == " " for line in lines[1:]), lines
    assert "2026-11-30 23:33:01" in lines[1] and ".123" not in lines[1]
    assert lines[1].endswith("0.9000") and lines[2].endswith("-")
