"""The service sub-commands' wiring (anytime_prune.service_cli and the modules it joins): the
verbs exist with their flags, and the name lists agree with the settings and the job statuses."""

from __future__ import annotations

import argparse

import pytest

from anytime_prune.cli import build_parser
from anytime_prune.serve_cli import QUEUES
from app_common.events import STATUSES
from app_common.settings import QUEUE_NAMES


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_verb_is_wired_in_help_order() -> None:
    names = list(subcommands(build_parser()))
    assert names == ["run", "compare", "serve", "api", "worker", "keys",
                     "submit", "status", "watch", "list", "cancel", "download"]


def test_queue_choices_are_the_settings_queues() -> None:
    # The CLI keeps its own tuple (settings needs pydantic-settings, which the client extra lacks).
    assert QUEUES == QUEUE_NAMES
    for argv in (["serve", "--queue", "gpu"], ["worker", "--queue", "cpu"]):
        assert build_parser().parse_args(argv).queue == argv[-1]


@pytest.mark.parametrize("status", STATUSES)
def test_list_accepts_every_job_status(status: str) -> None:
    assert build_parser().parse_args(["list", "--status", status]).status == status
    with pytest.raises(SystemExit):
        build_parser().parse_args(["list", "--status", "sleeping"])
