#!/usr/bin/env bash
# The whole test suite, set-up included: ./scripts/test.sh [pytest args]
# Lint (ruff) and types (mypy, configured in pyproject.toml) run first: a bare `ruff check .` and a
# bare `mypy` must be clean, so they are part of what CI checks.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
echo "ruff check ." && ruff check .
echo "mypy" && mypy
exec python -m pytest "$@"
