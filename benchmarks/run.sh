#!/usr/bin/env bash
# One command: kgpool vs Jupyter Kernel Gateway (notebook-http) on the bundled convert notebook.
#   bash benchmarks/run.sh            # full sweep: kernels 1,2,4 x concurrency 1,4,16,64, 5 s runs
#   bash benchmarks/run.sh --quick    # kernels 1,2 x concurrency 1,16, 3 s runs
#   bash benchmarks/run.sh --help     # every option (durations, kernel counts, phases to skip)
# Builds two virtualenvs on first use: .venv-kg (the peer, jupyter_kernel_gateway 3.0.1 + ipykernel)
# and .venv-bench (kgpool from this repo, editable, + matplotlib). Installs wrk with apt-get if missing.
# Writes benchmarks/results/latest.{md,png,json}; logs in benchmarks/results/logs/.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PY="${PYTHON:-python3}"

if ! command -v wrk >/dev/null 2>&1; then
    echo "installing wrk" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi

if ! "$HERE/.venv-kg/bin/python" -c "import importlib.metadata as m, ipykernel; \
assert m.version('jupyter_kernel_gateway') == '3.0.1'" 2>/dev/null; then
    echo "building .venv-kg (jupyter_kernel_gateway 3.0.1)" >&2
    "$PY" -m venv "$HERE/.venv-kg"
    "$HERE/.venv-kg/bin/pip" install -q --disable-pip-version-check 'jupyter_kernel_gateway==3.0.1' ipykernel
fi

if [ ! -x "$HERE/.venv-bench/bin/python" ]; then
    "$PY" -m venv "$HERE/.venv-bench"
fi
if ! "$HERE/.venv-bench/bin/python" -c "import matplotlib" 2>/dev/null; then
    "$HERE/.venv-bench/bin/pip" install -q --disable-pip-version-check matplotlib
fi
# kgpool, editable; reinstalled when pyproject.toml changes (new dependencies)
STAMP="$HERE/.venv-bench/.kgpool-installed"
if [ -f "$REPO/pyproject.toml" ] && [ -f "$REPO/kgpool/cli.py" ]; then
    if [ ! -x "$HERE/.venv-bench/bin/kgpool" ] || [ "$REPO/pyproject.toml" -nt "$STAMP" ]; then
        echo "installing kgpool into .venv-bench" >&2
        "$HERE/.venv-bench/bin/pip" install -q --disable-pip-version-check -e "$REPO" && touch "$STAMP"
    fi
else
    echo "kgpool not found in $REPO (no kgpool/cli.py yet): Kernel Gateway only" >&2
fi

exec "$HERE/.venv-bench/bin/python" "$HERE/bench.py" "$@"
