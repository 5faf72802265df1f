#!/usr/bin/env bash
# The one test command (README, CI): installs kgpool with its test extras into .venv, installs
# the system tools the suite needs (Debian's prometheus for promtool and the real-Prometheus test),
# runs the whole pytest suite, then the deployment checks (alert rules, manifests, container).
#   bash tests/run.sh            everything
#   bash tests/run.sh -k web     extra arguments go to pytest (deployment checks are skipped)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
step() { printf '\n=== [%ss] %s\n' "$SECONDS" "$*"; }

step "python environment (.venv)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

missing=""
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing="prometheus"
command -v chromium >/dev/null || missing="$missing chromium"
if [ -n "$missing" ]; then
  step "apt: $missing (Prometheus server + promtool; headless Chromium for the browser tests)"
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null
    # shellcheck disable=SC2086
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends $missing >/dev/null
  else
    echo "not root: the Prometheus and browser tests will be skipped" >&2
  fi
fi

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
