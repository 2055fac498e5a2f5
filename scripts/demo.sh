#!/usr/bin/env bash
# One command from a fresh checkout: install, start the all-in-one service (embedded Redis, one
# worker, the API on http://127.0.0.1:8000), submit a digits APP job, follow it live, download the
# sparse checkpoint into ./demo-artifacts, then keep serving until Ctrl-C.
#
# It also prints the dashboard's address and the development API key to sign in with, as soon as
# the service answers: the demo job is on the dashboard while it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh

# The key is the one `serve` writes to its credentials file (with serve's pid, which is this
# shell's: exec below keeps it); a watcher prints it once that file is this run's and the API is up.
python - "$$" <<'EOF' &
import os, sys, time

import httpx

from anytime_prune.credentials import read_credentials

pid = int(sys.argv[1])
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(0)  # serve is gone (it printed why)
    try:
        creds = read_credentials() or {}
    except (OSError, ValueError):
        creds = {}
    if creds.get("pid") == pid:
        try:
            ready = httpx.get(f"{creds['url']}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            ready = False
        if ready:
            print(f"dashboard: {creds['url']}/  (sign in with the API key {creds['api_key']})", flush=True)
            sys.exit(0)
    time.sleep(0.2)
EOF

exec anytime-prune serve --demo "$@"
