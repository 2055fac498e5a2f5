#!/usr/bin/env bash
# Fill wheelhouse/ with the wheels that scripts/gpu-check.sh installs on a GPU machine with no
# network: CPython 3.12 manylinux x86-64 wheels for what the api, worker and client roles need,
# and the project's own wheel. Run it on a machine with network (here), then carry wheelhouse/
# with the working tree (it is git-ignored).
#
# Left out, because the GPU machine's Python already has them and they are large: torch (never
# carried: the machine's CUDA build is the one to test) and the engine's numeric stack
# (WHEELHOUSE_SKIP, default numpy, scikit-learn, scipy, matplotlib, pillow). Their dependencies
# are not downloaded either. The total must stay well under the device tool's 64 MiB carry limit.
#
#   scripts/build-wheelhouse.sh            # -> wheelhouse/, prints the total size
#   WHEELHOUSE=/tmp/wh scripts/build-wheelhouse.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${WHEELHOUSE:-$root/wheelhouse}"
python="${PYTHON:-python3}"
skip="${WHEELHOUSE_SKIP:-numpy scikit-learn scipy matplotlib pillow}"
# The GPU machine's Python; another version only to try the install on a machine without 3.12.
pyver="${WHEELHOUSE_PYTHON_VERSION:-3.12}"
abi="cp${pyver/./}"
limit_mib=56 # leaves room under the 64 MiB carry limit for the working tree itself

rm -rf "$out"
mkdir -p "$out"
cd "$root"

# The project's own wheel (pure Python), from this working tree; setuptools builds it in build/,
# removed again unless it was there before.
[ -e build ] && had_build=1 || had_build=0
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$out" .
[ "$had_build" = 1 ] || rm -rf build

# The direct requirements of the roles, read from pyproject.toml: the extras api, client, worker
# and engine (the worker's), without the project itself, torch and the skipped packages.
reqs="$out/.requirements.txt"
SKIP="$skip" "$python" - "$root/pyproject.toml" > "$reqs" <<'EOF'
import os
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
skip = {"torch", "anytime-prune", *os.environ["SKIP"].split()}
seen: set[str] = set()
for extra in ("api", "client", "worker", "engine"):
    for req in extras[extra]:
        name = re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")
        if name not in skip and req not in seen:
            seen.add(req)
            print(req)
EOF

# Everything they need, resolved for CPython 3.12 on manylinux x86-64 (binary wheels only).
# The local pip constraints that cap torch for this machine do not apply to that one; nor do the
# warnings about this machine's local package folders that have no such package.
PIP_CONSTRAINT="" "$python" -m pip download --quiet --disable-pip-version-check \
    --only-binary=:all: --python-version "$pyver" --implementation cp --abi "$abi" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest "$out" -r "$reqs" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
rm -f "$reqs"

# What the resolver must not have brought in through a dependency.
for name in torch $skip; do
    pattern="$(echo "$name" | tr '-' '_')"
    if ls "$out" | grep -qi "^${pattern}-"; then
        echo "error: $name came in through a dependency; it must not be carried" >&2
        exit 1
    fi
done

count="$(ls "$out"/*.whl | wc -l)"
bytes="$(du -cb "$out"/*.whl | tail -1 | cut -f1)"
mib="$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')"
echo "wheelhouse: $count wheels, $mib MiB in $out"
if [ "$bytes" -gt $((limit_mib * 1048576)) ]; then
    echo "error: over $limit_mib MiB; the device tool carries at most 64 MiB with the working tree" >&2
    exit 1
fi
