#!/usr/bin/env bash
# The one test command (README, CI): installs kgpool with its test extras into .venv, installs
# the system tools the suite needs (Debian's prometheus for promtool and the real-Prometheus test,
# chromium for the browser tests) and the kernels of the other languages kgpool serves, runs the
# whole pytest suite, then the deployment checks (alert rules, manifests, container).
#   bash tests/run.sh            everything
#   bash tests/run.sh -k web     extra arguments go to pytest (deployment checks are skipped)
# Every install step is skipped when already done, needs no stdin, and keeps what it downloads
# in one cache folder that the next run reuses: $KGPOOL_TEST_CACHE (default ~/.cache/kgpool-tests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
step() { printf '\n=== [%ss] %s\n' "$SECONDS" "$*"; }
CACHE="${KGPOOL_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kgpool-tests}"
KERNELS=.venv/share/jupyter/kernels
# The other languages' kernels (tests/test_languages.py), pinned:
BASH_KERNEL=bash_kernel==0.10.0          # PyPI; its kernelspec goes into .venv (--sys-prefix)
OCTAVE_KERNEL=octave_kernel==1.1.1       # PyPI, for Debian's octave; ships its kernelspec
IJAVASCRIPT=ijavascript@5.2.1            # npm, for node; kernelspec "javascript" written below
# Debian: R with IRkernel (kernelspec "ir"), Octave, and the ZeroMQ library that ijavascript's
# zeromq@5 is compiled against (its prebuilt binaries stop at Node 18; the bundled-libzmq build
# would download libzmq's source, which npm cannot do here)
APT_KERNELS="r-cran-irkernel octave libzmq3-dev"

step "install plan (cache: $CACHE)"
cat <<PLAN
  pip into .venv: kgpool[test], $BASH_KERNEL, $OCTAVE_KERNEL
  apt (root only, if missing): $APT_KERNELS; prometheus; chromium; nodejs npm if node is absent
  npm into $CACHE/node: $IJAVASCRIPT, its zeromq binding compiled against Debian's libzmq
PLAN
mkdir -p "$CACHE/pip" "$CACHE/npm" "$CACHE/apt/partial"

step "python environment (.venv)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --cache-dir "$CACHE/pip" \
  -e '.[test]' "$BASH_KERNEL" "$OCTAVE_KERNEL"

missing=""
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing="prometheus"
command -v chromium >/dev/null || missing="$missing chromium"
for pkg in $APT_KERNELS; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
    || missing="$missing $pkg"
done
command -v node >/dev/null && command -v npm >/dev/null || missing="$missing nodejs npm"
command -v make >/dev/null && command -v g++ >/dev/null || missing="$missing make g++"
if [ -n "$missing" ]; then
  step "apt:$missing"
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt=(apt-get -o DPkg::Lock::Timeout=300 -o "Dir::Cache::Archives=$CACHE/apt/")
    "${apt[@]}" update -q >/dev/null
    # shellcheck disable=SC2086
    "${apt[@]}" install -y -q --no-install-recommends $missing </dev/null >/dev/null
  else
    echo "not root: the Prometheus, browser and missing-language tests will be skipped" >&2
  fi
fi

step "kernels: bash, R, Octave, JavaScript"
[ -f "$KERNELS/bash/kernel.json" ] || .venv/bin/python -m bash_kernel.install --sys-prefix
if command -v npm >/dev/null; then
  ijs="$CACHE/node/node_modules/ijavascript"
  if [ "$(node -p "require('$ijs/package.json').version" 2>/dev/null)" != "${IJAVASCRIPT#*@}" ]; then
    npm_config_zmq_external=true npm install --prefix "$CACHE/node" --cache "$CACHE/npm" \
      --no-audit --no-fund --loglevel=error "$IJAVASCRIPT" </dev/null
  fi
  # What `ijsinstall --spec-path=full` would write, into .venv instead of ~/.local
  mkdir -p "$KERNELS/javascript"
  printf '{"argv": ["%s", "%s", "--hide-undefined", "{connection_file}", "--protocol=5.1"],
 "display_name": "JavaScript (Node.js)", "language": "javascript"}\n' \
    "$(command -v node)" "$ijs/lib/kernel.js" > "$KERNELS/javascript/kernel.json"
  node -e "require('$CACHE/node/node_modules/zeromq')" \
    || echo "the JavaScript kernel cannot load zeromq: its tests will fail" >&2
fi
.venv/bin/jupyter kernelspec list
.venv/bin/python - <<'CHECK'
import sys
from jupyter_client.kernelspec import find_kernel_specs
missing = sorted({"bash", "ir", "octave", "javascript"} - set(find_kernel_specs()))
if missing:
    print("kernel specs missing:", *missing, "(skipped, or failing under CI)", file=sys.stderr)
CHECK

step "pytest (default: direct channel)"
.venv/bin/python -m pytest --durations=15 "$@"

if [ "$#" -eq 0 ]; then
  # Every test again with requests as plain execute_requests: the two channels must behave
  # identically. Only tests marked channel_independent (pure code, the Jupyter protocol alone,
  # the parity suite that runs both channels itself) are left out, so a new module is in.
  step "pytest (KGPOOL_CHANNEL=jupyter)"
  KGPOOL_CHANNEL=jupyter .venv/bin/python -m pytest -q -m "not channel_independent"
  # And with --fork (kernels forked from a template), the modules about the kernels' life:
  # crashes, timeouts, recycling, growth, reloads, in-process services, rich outputs. The whole
  # suite passes this way too (KGPOOL_FORK=1 pytest -m "not channel_independent and not
  # no_fork", ~3.5 min more); the other modules test HTTP, the CLI and Kernel Gateway's options,
  # which do not depend on how kernels are made. tests/test_fork.py and the parity corpus run
  # --fork themselves in the first pass.
  step "pytest (KGPOOL_FORK=1: kernels' life)"
  KGPOOL_FORK=1 .venv/bin/python -m pytest -q -m "not channel_independent and not no_fork" \
    tests/test_resilience.py tests/test_elastic.py tests/test_notebooks.py \
    tests/test_service.py tests/test_app.py tests/test_rich.py
fi

if [ "$#" -eq 0 ]; then
  step "observability checks (promtool)"
  KGPOOL_PYTHON="$PWD/.venv/bin/python" bash deploy/observability-checks.sh
  step "deployment lint (hadolint, kustomize + kubernetes-validate, yamllint)"
  bash deploy/lint.sh
  step "container smoke test (podman)"
  bash deploy/container-smoke.sh
fi
step "all passed"
