"""``anytime-prune webhooks``: show or rotate the API key's webhook signing secret; list a job's
delivery attempts."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from anytime_prune.client_cli import EXIT_OK, _client_parser, print_json, print_table, short_time

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


def cmd_deliveries(args: argparse.Namespace, client: Client) -> int:
    attempts = client.deliveries(args.job_id)
    if args.json:
        print_json(attempts)
        return EXIT_OK
    if not attempts:
        print(f"no delivery attempts for job {args.job_id} yet", file=sys.stderr)
        return EXIT_OK
    rows = [("time (UTC)", "event", "megabatch", "webhook-id", "attempt", "status", "outcome", "next (UTC) / error")]
    for a in attempts:
        megabatch = a.get("megabatch")
        detail = a.get("error") or (short_time(a["next_attempt_at"]) if a.get("next_attempt_at") else "")
        rows.append((short_time(a["time"]), a["event"], "" if megabatch is None else str(megabatch), a["webhook_id"],
                     str(a["attempt"]), "-" if a.get("status_code") is None else str(a["status_code"]),
                     a["outcome"], detail))
    print_table(rows, right=(2, 4, 5))
    return EXIT_OK


def add_webhooks_command(sub: Any) -> None:
    """Add ``webhooks secret``, ``webhooks rotate`` and ``webhooks deliveries`` to the
    ``anytime-prune`` parser's subparsers."""
    w = sub.add_parser(
        "webhooks", help="the API key's webhook signing secret; a job's delivery attempts",
        description="Webhooks (notify in a job request) are signed with your API key's secret (Standard "
        "Webhooks): verify them with standardwebhooks.Webhook(secret).verify(body, headers).",
    )
    wsub = w.add_subparsers(dest="webhooks_command", required=True, metavar="ACTION")
    _client_parser(wsub, "secret", cmd_secret, "print the signing secret (created on first use)", job_id=False)
    _client_parser(wsub, "rotate", cmd_rotate, "replace the signing secret; prints the new one", job_id=False)
    _client_parser(wsub, "deliveries", cmd_deliveries, "a job's webhook delivery attempts, oldest first (time, "
                   "event, attempt, receiver's status or error, outcome)")
