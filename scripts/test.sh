#!/usr/bin/env bash
# The whole test suite, set-up included: ./scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
exec python -m pytest "$@"
