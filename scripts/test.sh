#!/usr/bin/env bash
# The whole test suite, set-up included: ./scripts/test.sh [pytest args]
# Lint (ruff) and types (mypy, configured in pyproject.toml) run first: a bare `ruff check .` and a
# bare `mypy` must be clean, so they are part of what CI checks.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
echo "ruff check ." && ruff check .
echo "mypy" && mypy
# Two test processes (APP_TEST_PROCESSES; 0 runs in this one), whole files to each, so a module's
# shared service stack stays in one process. One compute thread per process: torch's OpenMP threads
# spin while they wait, and two processes of two threads each on two cores would mostly wait.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -n "${APP_TEST_PROCESSES:-2}" --dist loadfile "$@"
