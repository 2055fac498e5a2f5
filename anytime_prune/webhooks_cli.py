"""``anytime-prune webhooks``: show or rotate the API key's webhook signing secret."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from anytime_prune.client_cli import _client_parser, print_json

if TYPE_CHECKING:
    from anytime_prune.client import Client


def _show(args: argparse.Namespace, secret: str) -> None:
    if args.json:
        print_json({"secret": secret})
    else:
        print(secret)


def cmd_secret(args: argparse.Namespace, client: Client) -> int:
    _show(args, client.webhook_secret())
    return 0


def cmd_rotate(args: argparse.Namespace, client: Client) -> int:
    _show(args, client.rotate_webhook_secret())
    print("deliveries are signed with this secret from now on; the old one no longer verifies", file=sys.stderr)
    return 0


def add_webhooks_command(sub: Any) -> None:
    """Add ``webhooks secret`` and ``webhooks rotate`` to the ``anytime-prune`` parser's subparsers."""
    w = sub.add_parser(
        "webhooks", help="the API key's webhook signing secret",
        description="Webhooks (notify in a job request) are signed with your API key's secret (Standard "
        "Webhooks): verify them with standardwebhooks.Webhook(secret).verify(body, headers).",
    )
    wsub = w.add_subparsers(dest="webhooks_command", required=True, metavar="ACTION")
    _client_parser(wsub, "secret", cmd_secret, "print the signing secret (created on first use)", job_id=False)
    _client_parser(wsub, "rotate", cmd_rotate, "replace the signing secret; prints the new one", job_id=False)
