#!/usr/bin/env bash
# --fork against classic kernels on a 400 MB numpy model (issue 15): memory, recovery, burst.
#   bash benchmarks/fork.sh             # everything (~5 min; up to ~3.5 GB of kernels at once)
#   bash benchmarks/fork.sh --help      # options: --skip, --burst-rounds, --megabytes, --name ...
# Uses .venv-bench (kgpool from this repo, editable, + matplotlib, which brings numpy: the
# benchmark notebook's kernels run in that environment and import numpy). Writes
# benchmarks/results/NAME.{md,json} (default issue15-fork); logs in results/logs/fork/.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
VENV="$HERE/.venv-bench"
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -c "import matplotlib, numpy" 2>/dev/null || \
    "$VENV/bin/pip" install -q --disable-pip-version-check matplotlib numpy
STAMP="$VENV/.kgpool-installed"
if [ ! -x "$VENV/bin/kgpool" ] || [ "$REPO/pyproject.toml" -nt "$STAMP" ]; then
    echo "installing kgpool (editable) into .venv-bench" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$REPO" && touch "$STAMP"
fi
cd "$HERE"
exec "$VENV/bin/python" "$HERE/fork.py" "$@"
