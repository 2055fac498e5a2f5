#!/usr/bin/env bash
# One command from a fresh checkout: install, start the all-in-one service (embedded Redis, one
# worker, the API on http://127.0.0.1:8000), submit a digits APP job, follow it live, download the
# sparse checkpoint into ./demo-artifacts, then keep serving until Ctrl-C.
#
# serve prints the dashboard's address and the development API key to sign in with: the demo job
# is on the dashboard while it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh

exec anytime-prune serve --demo "$@"
