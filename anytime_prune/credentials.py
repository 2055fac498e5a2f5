"""The credentials file ``anytime-prune serve`` writes for the client on the same machine (the
service's URL and a development API key), readable by its owner only.

Standard library only: imported by the client, ``serve`` and ``keys``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_HOME = "ANYTIME_PRUNE_HOME"
CREDENTIALS_FILE = "credentials.json"


def config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where ``serve`` writes the credentials file: ``$ANYTIME_PRUNE_HOME``, else
    ``$XDG_CONFIG_HOME/anytime-prune``, else ``~/.config/anytime-prune``."""
    env = os.environ if environ is None else environ
    if env.get(ENV_HOME):
        return Path(env[ENV_HOME]).expanduser()
    if env.get("XDG_CONFIG_HOME"):
        return Path(env["XDG_CONFIG_HOME"]).expanduser() / "anytime-prune"
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".config" / "anytime-prune"


def credentials_path(environ: Mapping[str, str] | None = None) -> Path:
    return config_dir(environ) / CREDENTIALS_FILE


def read_credentials(path: Path | None = None) -> dict[str, Any] | None:
    """The credentials ``serve`` wrote (``url``, ``api_key``, ``key_id``, ``redis_url``...), or
    None when there is no such file."""
    path = credentials_path() if path is None else path
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else None


def write_credentials(data: Mapping[str, Any], path: Path | None = None) -> Path:
    """Write ``data`` readable by its owner only (0600, folder 0700), atomically: a reader never
    sees half a file, and the secret is never world-readable, not even for a moment."""
    path = credentials_path() if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".credentials-", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(dict(data), fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
