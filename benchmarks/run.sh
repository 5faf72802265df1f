#!/usr/bin/env bash
# One command: kgpool vs Jupyter Kernel Gateway (notebook-http) on the bundled convert notebook.
#   bash benchmarks/run.sh            # full sweep: kernels 1,2,4 x concurrency 1,4,16,64, 5 s runs
#   bash benchmarks/run.sh --quick    # kernels 1,2 x concurrency 1,16, 3 s runs
#   bash benchmarks/run.sh --help     # every option (durations, kernel counts, phases to skip)
#   bash benchmarks/run.sh serving    # batching and streaming (benchmarks/serving.py; --help)
#   bash benchmarks/run.sh soak       # 200,000 requests, memory sampled (benchmarks/soak.py; --help)
#   KGPOOL_REF=HEAD bash benchmarks/run.sh   # kgpool from a commit (own venv) instead of the working tree
#   KGPOOL_BASE=f166a32 bash benchmarks/run.sh --servers kgpool-direct,base-direct
#                                   # the working tree and a baseline commit, in the same rotation
# Builds two virtualenvs on first use: .venv-kg (the peer, jupyter_kernel_gateway 3.0.1 + ipykernel)
# and .venv-bench (kgpool from this repo, editable, + matplotlib). Installs wrk with apt-get if missing.
# Writes benchmarks/results/local/run-<time>.{md,png,json} (not in git; --name latest updates the
# committed results/latest.*); logs in benchmarks/results/logs/. Prints how long the run will take.
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

if [ -n "${KGPOOL_REF:-}" ]; then
    # benchmark a commit instead of the working tree: KGPOOL_REF=HEAD bash benchmarks/run.sh
    SHA="$(git -C "$REPO" rev-parse --short "$KGPOOL_REF")"
    VENV="$HERE/.venv-bench-ref"
    SRC="$HERE/.kgpool-src"
    rm -rf "$SRC" && mkdir -p "$SRC"
    git -C "$REPO" archive "$SHA" | tar -x -C "$SRC"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -c "import matplotlib" 2>/dev/null || "$VENV/bin/pip" install -q --disable-pip-version-check matplotlib
    echo "installing kgpool $SHA into .venv-bench-ref" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$SRC"
    "$VENV/bin/pip" install -q --disable-pip-version-check "$SRC"   # its dependencies, if new
    export KGBENCH_VENV="$VENV" KGBENCH_KGPOOL_DESC="commit $SHA ($KGPOOL_REF)"
else
    VENV="$HERE/.venv-bench"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -c "import matplotlib" 2>/dev/null || "$VENV/bin/pip" install -q --disable-pip-version-check matplotlib
    # kgpool from the working tree, editable; reinstalled when pyproject.toml changes (new dependencies)
    STAMP="$VENV/.kgpool-installed"
    if [ -f "$REPO/pyproject.toml" ] && [ -f "$REPO/kgpool/cli.py" ]; then
        if [ ! -x "$VENV/bin/kgpool" ] || [ "$REPO/pyproject.toml" -nt "$STAMP" ]; then
            echo "installing kgpool (editable) into .venv-bench" >&2
            "$VENV/bin/pip" install -q --disable-pip-version-check -e "$REPO" && touch "$STAMP"
        fi
    else
        echo "kgpool not found in $REPO (no kgpool/cli.py yet): Kernel Gateway only" >&2
    fi
    export KGBENCH_VENV="$VENV"
fi

if [ -n "${KGPOOL_BASE:-}" ]; then
    # a baseline commit as servers base-direct / base-jupyter, beside the measured kgpool
    BSHA="$(git -C "$REPO" rev-parse --short "$KGPOOL_BASE")"
    BVENV="$HERE/.venv-bench-base"
    BSRC="$HERE/.kgpool-base-src"
    rm -rf "$BSRC" && mkdir -p "$BSRC"
    git -C "$REPO" archive "$BSHA" | tar -x -C "$BSRC"
    [ -x "$BVENV/bin/python" ] || "$PY" -m venv "$BVENV"
    echo "installing baseline kgpool $BSHA into .venv-bench-base" >&2
    "$BVENV/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$BSRC"
    "$BVENV/bin/pip" install -q --disable-pip-version-check "$BSRC"
    export KGBENCH_BASE_VENV="$BVENV" KGBENCH_BASE_DESC="commit $BSHA ($KGPOOL_BASE)"
fi

if [ "${1:-}" = "serving" ]; then
    shift
    "$VENV/bin/python" -c "import sklearn" 2>/dev/null || "$VENV/bin/pip" install -q --disable-pip-version-check scikit-learn
    exec "$VENV/bin/python" "$HERE/serving.py" "$@"
fi
if [ "${1:-}" = "soak" ]; then
    shift
    exec "$VENV/bin/python" "$HERE/soak.py" "$@"
fi
exec "$VENV/bin/python" "$HERE/bench.py" "$@"
