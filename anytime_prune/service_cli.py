"""Service sub-commands of ``anytime-prune``: run the service (``serve``, ``api``, ``worker``:
:mod:`anytime_prune.serve_cli`), manage API keys (``keys``: :mod:`anytime_prune.keys_cli`), and
talk to it (``submit``, ``status``, ``watch``, ``list``, ``cancel``, ``download`` and ``datasets``:
:mod:`anytime_prune.client_cli`).

Imports are per sub-command: the client verbs need httpx only (never torch, fastapi or celery),
``api`` needs fastapi, ``worker`` celery; the engine (torch) is loaded only inside a worker's job.
"""

from __future__ import annotations

from typing import Any

from anytime_prune.client_cli import add_client_commands
from anytime_prune.keys_cli import add_keys_command
from anytime_prune.serve_cli import add_serve_commands


def add_service_commands(sub: Any) -> None:
    """Add the service sub-commands to the ``anytime-prune`` parser's subparsers (in the order
    ``anytime-prune -h`` lists them)."""
    add_serve_commands(sub)
    add_keys_command(sub)
    add_client_commands(sub)
