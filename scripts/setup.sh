#!/usr/bin/env bash
# Creates .venv (once) and installs the project with its `dev` extra: every role (engine, client,
# api, worker) plus the test, lint and type-check tools.
# torch is installed first and pinned to 2.13.0: an unpinned torch would pull the CUDA build.
# Source it (". scripts/setup.sh") to get the virtual environment activated.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${APP_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.anytime-prune-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet "torch==2.13.0"
    python -m pip install --quiet -e "$root[dev]"
    echo "$want" > "$stamp"
fi
