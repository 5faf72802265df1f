#!/usr/bin/env bash
# The one test command (README, CI). In order:
#   1. the install plan: everything that is missing and would be installed, and where; printed
#      before anything is installed (`bash tests/run.sh --plan` prints it and stops)
#   2. installs, each skipped when already done: kgpool with its test extras and the kernels of
#      the other languages kgpool serves into .venv (pip), Debian packages (root only: the
#      kernels' languages, Prometheus, Chromium, podman for the container test), ijavascript
#      (npm, into the cache)
#   3. pytest on the direct channel and, beside it, KGPOOL_CHANNEL=jupyter for every test not
#      marked channel_independent; then the deployment checks (alert rules, manifests, container)
#   4. the leftovers check: everything ran with one private temp folder; anything left in it
#      fails the run, and the folder is removed (also after Ctrl-C or SIGTERM)
#   bash tests/run.sh            everything
#   bash tests/run.sh -k web     extra arguments go to both pytest passes (deployment checks
#                                are skipped)
# Needs no stdin. What it downloads is kept in one folder that the next run reuses (a second
# run downloads nothing): $KGPOOL_TEST_CACHE, default ~/.cache/kgpool-tests (pip and npm
# caches, apt archives, ijavascript, matplotlib's font cache, the linters' venv, the podman
# storage with the container test's base image).
#
# The private temp folder is /tmp/kgpool-tests-XXXXXX/tmp. As root the run happens in a mount
# namespace of its own where that folder is mounted on /tmp (and a sibling on /var/tmp), so
# even code that ignores TMPDIR writes into it and nothing of another process is counted;
# elsewhere (or with KGPOOL_TEST_NO_NAMESPACE=1) TMPDIR points at it and tests/hygiene.py also
# lists new suite-like names in /tmp. KGPOOL_TEST_SERIAL=1 runs the two pytest passes one after
# the other instead of side by side.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CACHE="${KGPOOL_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kgpool-tests}"
export KGPOOL_TEST_CACHE="$CACHE"
step() { printf '\n=== [%ss] %s\n' "$SECONDS" "$*"; }

# ---- the private temp folder: made here, the run inside, then checked and removed -----------
SELF="$PWD/tests/run.sh"
if [ -z "${KGPOOL_TEST_TMP:-}" ] && [ "${1:-}" != --plan ]; then
  RUN=$(mktemp -d /tmp/kgpool-tests-XXXXXX)
  chmod 755 "$RUN" && mkdir -m 1777 "$RUN/tmp" "$RUN/var-tmp"
  child="" sig="" killer=""
  # shellcheck disable=SC2329  # both run from traps
  finish() {
    [ -z "$killer" ] || kill "$killer" 2>/dev/null || true
    rm -rf "$RUN"
  }
  trap finish EXIT
  # shellcheck disable=SC2329
  stop() {  # Ctrl-C or SIGTERM: SIGINT to the whole run (pytest tears down), SIGKILL at 60 s
    sig=$1
    [ -z "$child" ] || kill -INT -- "-$child" 2>/dev/null || true
    if [ -n "$child" ] && [ -z "$killer" ]; then
      (sleep 60; kill -KILL -- "-$child" 2>/dev/null) </dev/null >/dev/null 2>&1 &
      killer=$!
    fi
  }
  trap 'stop 130' INT
  trap 'stop 143' TERM
  if [ "$(id -u)" = 0 ] && [ -z "${KGPOOL_TEST_NO_NAMESPACE:-}" ] &&
     unshare --mount --propagation private true 2>/dev/null; then
    where="its private /tmp and /var/tmp (mounted in a namespace of its own)"
    # shellcheck disable=SC2016  # $1.. belong to the inner shell
    env --default-signal=INT setsid unshare --mount --propagation private -- sh -c \
      'mount --bind "$1/var-tmp" /var/tmp && mount --bind "$1/tmp" /tmp && shift && exec "$@"' \
      sh "$RUN" env KGPOOL_TEST_TMP=/tmp TMPDIR=/tmp KGPOOL_TEST_RUN="$RUN" \
      bash "$SELF" "$@" </dev/null &
  else
    where="its TMPDIR"
    env --default-signal=INT setsid env KGPOOL_TEST_TMP="$RUN/tmp" TMPDIR="$RUN/tmp" \
      KGPOOL_TEST_RUN="$RUN" bash "$SELF" "$@" </dev/null &
  fi
  child=$!
  rc=0
  while kill -0 "$child" 2>/dev/null; do wait "$child" || rc=$?; done
  # what is left: in the temp folders, and in each pytest session's own (pass-*), where pytest's
  # basetemp (pytest-of-*) and what tests/hygiene.py keeps in _suite are the harness's own
  left=$(cd "$RUN" && { find tmp var-tmp -mindepth 1 -maxdepth 1 ! -name 'pass-*'
                        find tmp -mindepth 2 -maxdepth 2 -path 'tmp/pass-*/*' \
                          ! -name 'pytest-of-*' ! -name _suite; } | sort)
  if [ -n "$left" ]; then
    printf '\nLEFT BEHIND by this run in %s:\n' "$where" >&2
    # shellcheck disable=SC2086  # one name a line, none with spaces
    (cd "$RUN" && du -sh $left 2>/dev/null | sed 's|^|  |; s|\t| |') >&2
    [ "$rc" != 0 ] || rc=1
  else
    printf '\n=== nothing left behind in %s: %s removed\n' "$where" "$RUN"
  fi
  [ -z "$sig" ] || rc=$sig
  printf '=== wall time %dm%02ds, exit %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$rc"
  exit "$rc"
fi

# ---- inside: what to install -----------------------------------------------------------------
KERNELS=.venv/share/jupyter/kernels
# The other languages' kernels (tests/test_languages.py), pinned:
BASH_KERNEL=bash_kernel==0.10.0          # PyPI; its kernelspec goes into .venv (--sys-prefix)
OCTAVE_KERNEL=octave_kernel==1.1.1       # PyPI, for Debian's octave; ships its kernelspec
IJAVASCRIPT=ijavascript@5.2.1            # npm, for node; kernelspec "javascript" written below
# Debian: R with IRkernel (kernelspec "ir"), Octave, and the ZeroMQ library that ijavascript's
# zeromq@5 is compiled against (its prebuilt binaries stop at Node 18; the bundled-libzmq build
# would download libzmq's source, which npm cannot do here)
APT_KERNELS="r-cran-irkernel octave libzmq3-dev"
FULL=$(( $# == 0 ))
[ "${1:-}" != --plan ] || { PLAN_ONLY=1; shift; FULL=$(( $# == 0 )); }
PIP_WANT="$(sha256sum pyproject.toml | cut -c1-16) $BASH_KERNEL $OCTAVE_KERNEL $(python3 -V)"
PIP_STAMP=.venv/.kgpool-tests-installed
IJS_DIR="$CACHE/node/node_modules/ijavascript"
export LINT_VENV="$CACHE/lint-venv" WORK="$CACHE/container"  # deploy/lint.sh, container-smoke.sh

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
apt_missing() {
  local m="" pkg
  command -v prometheus >/dev/null && command -v promtool >/dev/null || m="prometheus"
  command -v chromium >/dev/null || m="$m chromium"
  for pkg in $APT_KERNELS; do installed "$pkg" || m="$m $pkg"; done
  command -v node >/dev/null && command -v npm >/dev/null || m="$m nodejs npm"
  command -v make >/dev/null && command -v g++ >/dev/null || m="$m make g++"
  if [ "$FULL" = 1 ]; then  # deploy/container-smoke.sh
    for pkg in podman runc debootstrap; do command -v "$pkg" >/dev/null || m="$m $pkg"; done
  fi
  echo "${m# }"
}
MISSING=$(apt_missing)

step "install plan (cache: $CACHE; private temp: ${KGPOOL_TEST_RUN:-/tmp/kgpool-tests-*})"
{
  if [ "$(cat "$PIP_STAMP" 2>/dev/null)" = "$PIP_WANT" ]; then
    echo "  pip: nothing (.venv is up to date with pyproject.toml)"
  else
    echo "  pip into .venv: kgpool[test] (editable), $BASH_KERNEL, $OCTAVE_KERNEL;" \
         "cache $CACHE/pip"
  fi
  if [ -z "$MISSING" ]; then
    echo "  apt: nothing (every Debian package needed is installed)"
  elif [ "$(id -u)" = 0 ]; then
    echo "  apt-get install --no-install-recommends: $MISSING; archives in $CACHE/apt"
  else
    echo "  apt: NOT installing (not root): $MISSING; the tests that need them are skipped"
  fi
  if [ "$(node -p "require('$IJS_DIR/package.json').version" 2>/dev/null)" = "${IJAVASCRIPT#*@}" ]
  then echo "  npm: nothing ($IJAVASCRIPT is in $CACHE/node)"
  else echo "  npm into $CACHE/node: $IJAVASCRIPT, its zeromq binding compiled against" \
            "Debian's libzmq; cache $CACHE/npm"
  fi
  echo "  kernel specs into $KERNELS: those of bash and JavaScript, if missing"
  if [ "$FULL" = 1 ]; then
    tools=$(sed -n 's/^TOOLS="\(.*\)"$/\1/p' deploy/lint.sh)
    if [ "$(cat "$LINT_VENV/.tools" 2>/dev/null)" = "$tools" ]; then
      echo "  linters: nothing (in $LINT_VENV)"
    else echo "  pip into $LINT_VENV (deploy/lint.sh): $tools"
    fi
    command -v kubectl >/dev/null || [ -x "$LINT_VENV/kubectl/usr/bin/kubectl" ] ||
      echo "  apt-get download kubernetes-client, unpacked into $LINT_VENV/kubectl (no kubectl)"
    echo "  podman storage in $WORK (deploy/container-smoke.sh): once, a Debian bookworm" \
         "base image by debootstrap from the apt mirror; the image build pip-installs kgpool's" \
         "dependencies (a cached layer until pyproject.toml changes)"
  fi
}
[ -z "${PLAN_ONLY:-}" ] || exit 0
mkdir -p "$CACHE/pip" "$CACHE/npm" "$CACHE/apt/partial"

# ---- installs ----------------------------------------------------------------------------------
step "python environment (.venv)"
[ -x .venv/bin/python ] || python3 -m venv .venv
if [ "$(cat "$PIP_STAMP" 2>/dev/null)" != "$PIP_WANT" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --cache-dir "$CACHE/pip" \
    -e '.[test]' "$BASH_KERNEL" "$OCTAVE_KERNEL" </dev/null
  echo "$PIP_WANT" > "$PIP_STAMP"
fi

if [ -n "$MISSING" ] && [ "$(id -u)" = 0 ]; then
  step "apt: $MISSING"
  export DEBIAN_FRONTEND=noninteractive
  apt=(apt-get -o DPkg::Lock::Timeout=300 -o "Dir::Cache::Archives=$CACHE/apt/")
  "${apt[@]}" update -q >/dev/null
  # shellcheck disable=SC2086
  "${apt[@]}" install -y -q --no-install-recommends $MISSING </dev/null >/dev/null
fi

step "kernels: bash, R, Octave, JavaScript"
[ -f "$KERNELS/bash/kernel.json" ] || .venv/bin/python -m bash_kernel.install --sys-prefix
if command -v npm >/dev/null; then
  if [ "$(node -p "require('$IJS_DIR/package.json').version" 2>/dev/null)" != "${IJAVASCRIPT#*@}" ]
  then
    npm_config_zmq_external=true npm install --prefix "$CACHE/node" --cache "$CACHE/npm" \
      --no-audit --no-fund --loglevel=error "$IJAVASCRIPT" </dev/null
  fi
  # What `ijsinstall --spec-path=full` would write, into .venv instead of ~/.local
  mkdir -p "$KERNELS/javascript"
  printf '{"argv": ["%s", "%s", "--hide-undefined", "{connection_file}", "--protocol=5.1"],
 "display_name": "JavaScript (Node.js)", "language": "javascript"}\n' \
    "$(command -v node)" "$IJS_DIR/lib/kernel.js" > "$KERNELS/javascript/kernel.json"
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

# ---- the suite ---------------------------------------------------------------------------------
# pytest sessions ("passes"):
#   direct    every test, requests on the direct channel (kgpool's default)
#   jupyter   every test not marked channel_independent again, with requests as plain
#             execute_requests (KGPOOL_CHANNEL=jupyter): the two channels must behave alike.
#             channel_independent tests (pure code, the Jupyter protocol alone, other
#             languages' kernels, what is settled before any kernel runs a request, the parity
#             suite that runs both channels itself) run once; a new module is in both.
#   fork      (whole runs only) with --fork (kernels forked from a template), the modules about
#             the kernels' life: crashes, timeouts, recycling, growth, reloads, in-process
#             services, rich outputs. The whole suite passes this way too (KGPOOL_FORK=1 pytest
#             -m "not channel_independent and not no_fork", ~3.5 min more); the other modules
#             test HTTP, the CLI and Kernel Gateway's options, which do not depend on how kernels
#             are made. tests/test_fork.py and the parity corpus run --fork themselves.
# The direct pass runs beside the other two, and in a whole run tests/test_languages.py beside
# it as a pass of its own (KGPOOL_TEST_SERIAL=1: all one after the other, languages in the
# direct pass): the suite mostly waits for kernels. Each pass has a temp folder of its own,
# checked at its end by tests/hygiene.py.
pytest_pass() {  # pytest_pass direct|jupyter|fork|languages LOG|- ARGS...
  local name=$1 log=$2 rc=0 tmp="$KGPOOL_TEST_TMP/pass-$1" channel=direct fork=""
  shift 2
  [ "$name" != jupyter ] || channel=jupyter
  [ "$name" != fork ] || fork=1
  mkdir -p "$tmp/_suite" && chmod 1777 "$tmp"
  # --default-signal: a command run with & starts with SIGINT ignored, which its processes
  # inherit (Ctrl-C would not stop pytest, and tests that send SIGINT would see it ignored)
  local run=(env --default-signal=INT KGPOOL_CHANNEL="$channel" KGPOOL_FORK="$fork" KGPOOL_TEST_TMP="$tmp"
             TMPDIR="$tmp" .venv/bin/python -m pytest "$@")
  if [ "$log" = - ]; then
    "${run[@]}" </dev/null || rc=$?
  else
    "${run[@]}" </dev/null >"$log" 2>&1 || rc=$?
  fi
  # pytest exits 5 when it selected no test: an error in the direct pass (nothing was tested);
  # in the jupyter pass, no selected test depends on the channel
  if [ "$rc" = 5 ] && [ "$name" = jupyter ]; then
    local note="(no selected test depends on the channel: nothing to run on the Jupyter channel)"
    if [ "$log" = - ]; then echo "$note"; else echo "$note" >>"$log"; fi
    rc=0
  elif [ "$rc" = 5 ]; then
    echo "tests/run.sh: the $name pass selected no test with: ${*:-(no arguments)}" >&2
    rc=1
  fi
  return "$rc"
}
JUPYTER=(-q --durations=5 -m "not channel_independent" "$@")
FORK=(-q --durations=5 -m "not channel_independent and not no_fork"
      tests/test_resilience.py tests/test_elastic.py tests/test_notebooks.py
      tests/test_service.py tests/test_app.py tests/test_rich.py)
if [ -n "${KGPOOL_TEST_SERIAL:-}" ]; then
  step "pytest (default: direct channel)"
  pytest_pass direct - --durations=15 "$@"
  step "pytest (KGPOOL_CHANNEL=jupyter)"
  pytest_pass jupyter - "${JUPYTER[@]}"
  if [ "$FULL" = 1 ]; then
    step "pytest (KGPOOL_FORK=1: kernels' life)"
    pytest_pass fork - "${FORK[@]}"
  fi
else
  LOGS="$KGPOOL_TEST_TMP/pass-jupyter/_suite"
  mkdir -p "$LOGS"
  step "pytest (default: direct channel); beside it KGPOOL_CHANNEL=jupyter" \
       "$([ "$FULL" = 0 ] || echo "then KGPOOL_FORK=1, and the other languages") (shown after)"
  (
    rc=0
    pytest_pass jupyter "$LOGS/jupyter.log" "${JUPYTER[@]}" || rc=$?
    [ "$FULL" = 0 ] || pytest_pass fork "$LOGS/fork.log" "${FORK[@]}" || rc=$?
    exit "$rc"
  ) &
  others=$!
  # A whole run also takes the other languages' kernels (about 1.5 min, direct channel) out of
  # the direct pass, the longest, into a third one beside it.
  DIRECT=(--durations=15 "$@")
  langs=""
  if [ "$FULL" = 1 ]; then
    DIRECT=(--durations=15 --ignore=tests/test_languages.py)
    pytest_pass languages "$LOGS/languages.log" -q --durations=5 tests/test_languages.py &
    langs=$!
  fi
  direct=0
  pytest_pass direct - "${DIRECT[@]}" || direct=$?
  rest=0
  wait "$others" || rest=$?
  if [ -n "$langs" ]; then
    wait "$langs" || rest=$?
    step "pytest (tests/test_languages.py: bash, R, Octave, JavaScript), run beside the first"
    cat "$LOGS/languages.log"
  fi
  step "pytest (KGPOOL_CHANNEL=jupyter), run beside the first"
  cat "$LOGS/jupyter.log"
  if [ "$FULL" = 1 ]; then
    step "pytest (KGPOOL_FORK=1: kernels' life), run beside the first"
    cat "$LOGS/fork.log"
  fi
  [ "$direct" = 0 ] || exit "$direct"
  [ "$rest" = 0 ] || exit "$rest"
fi

if [ "$FULL" = 1 ]; then
  step "observability checks (promtool)"
  KGPOOL_PYTHON="$PWD/.venv/bin/python" bash deploy/observability-checks.sh </dev/null
  step "deployment lint (hadolint, kustomize + kubernetes-validate, yamllint)"
  bash deploy/lint.sh </dev/null
  step "container smoke test (podman)"
  bash deploy/container-smoke.sh </dev/null
fi
step "all passed"
