"""The `anytime-prune` command. Sub-commands import what they need lazily, so the client verbs
start without torch."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys

from anytime_prune.engine_cli import add_engine_commands
from anytime_prune.restricted_imagenet_cli import add_restricted_imagenet_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anytime-prune",
        description="Anytime Progressive Pruning: train sparse networks on a stream of megabatches.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_engine_commands(sub)
    add_restricted_imagenet_command(sub)
    # find_spec, not try/except ImportError: a real import error in the module must surface.
    if importlib.util.find_spec("anytime_prune.service_cli") is not None:
        from anytime_prune.service_cli import add_service_commands

        add_service_commands(sub)
        from anytime_prune.webhooks_cli import add_webhooks_command

        add_webhooks_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if not sys.stderr.isatty() else "%(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
