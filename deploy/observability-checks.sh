#!/usr/bin/env bash
# Checks everything an operator installs beside kgpool, with the real Prometheus tools:
#   promtool check rules / test rules on deploy/prometheus/alerts.yml
#   promtool check config on the scrape configs
#   the Grafana dashboard parses, is up to date with its generator, and its queries (and the
#     alerts') use only the metric names of deploy/prometheus/contract-metrics.txt
#   a running kgpool's /metrics through `promtool check metrics` and against the contract
#
# Usage:
#   deploy/observability-checks.sh                 # starts kgpool itself (bundled notebook)
#   deploy/observability-checks.sh http://127.0.0.1:8888   # checks a kgpool that is running
#   KGPOOL_PYTHON=/path/to/venv/bin/python deploy/observability-checks.sh
#
# Installs Debian's `prometheus` package when promtool is missing (needs root). Only ever talks
# to 127.0.0.1 when it starts kgpool itself. Exits non-zero if any check failed.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROM="$ROOT/deploy/prometheus"
GRAFANA="$ROOT/deploy/grafana"
URL="${1:-}"
FAILED=()
TMP=$(mktemp -d)
KGPOOL_PID=""

say() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*"; FAILED+=("$*"); }
pass() { printf 'ok: %s\n' "$*"; }

cleanup() {
    if [[ -n "$KGPOOL_PID" ]] && kill -0 "$KGPOOL_PID" 2>/dev/null; then
        kill -TERM "$KGPOOL_PID" 2>/dev/null
        for _ in $(seq 1 100); do kill -0 "$KGPOOL_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$KGPOOL_PID" 2>/dev/null
        wait "$KGPOOL_PID" 2>/dev/null
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

pick_python() {
    if [[ -n "${KGPOOL_PYTHON:-}" ]]; then echo "$KGPOOL_PYTHON"
    elif [[ -x "$ROOT/.venv/bin/python" ]]; then echo "$ROOT/.venv/bin/python"
    else command -v python3
    fi
}

# ---- promtool -------------------------------------------------------------------------------
install_promtool() {
    if [[ $(id -u) -ne 0 ]]; then
        fail "promtool is missing and installing Debian's prometheus package needs root"
        return 1
    fi
    # The package's maintainer script may try to start a prometheus daemon on :9090 (it does not
    # where policy-rc.d forbids it or systemd is absent). Remember which prometheus processes
    # existed before, and stop only those that appeared during the install.
    local before after pid
    before=$(pgrep -x prometheus || true)
    apt-get update -qq >"$TMP/apt.log" 2>&1
    if ! DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
            --no-install-recommends prometheus >>"$TMP/apt.log" 2>&1; then
        tail -20 "$TMP/apt.log"
        fail "apt-get install prometheus"
        return 1
    fi
    after=$(pgrep -x prometheus || true)
    for pid in $after; do
        if ! grep -qx "$pid" <<<"$before"; then
            echo "stopping the prometheus daemon (pid $pid) that the package started"
            kill -TERM "$pid" 2>/dev/null
        fi
    done
}

say "promtool"
if ! command -v promtool >/dev/null; then
    echo "promtool not found: installing Debian's prometheus package"
    install_promtool
fi
if ! command -v promtool >/dev/null; then
    fail "promtool unavailable"
    printf '\n%d check(s) FAILED\n' "${#FAILED[@]}"
    exit 1
fi
promtool --version 2>&1 | head -1

say "alert rules"
if promtool check rules "$PROM/alerts.yml"; then pass "promtool check rules"; else fail "promtool check rules alerts.yml"; fi
if (cd "$PROM" && promtool test rules alerts_test.yml); then pass "promtool test rules"; else fail "promtool test rules alerts_test.yml"; fi

say "scrape configs"
for cfg in prometheus.yml prometheus-compose.yml; do
    if (cd "$PROM" && promtool check config "$cfg"); then pass "promtool check config $cfg"
    else fail "promtool check config $cfg"; fi
done
# Debian builds Prometheus without the Kubernetes service discovery, so its promtool rejects
# kubernetes_sd_configs as an unknown field. Then check a copy whose discovery block is swapped
# for a static target: that still validates the relabelling rules and everything else.
out=$(cd "$PROM" && promtool check config prometheus-kubernetes.yml 2>&1); rc=$?
if [[ $rc -eq 0 ]]; then echo "$out"; pass "promtool check config prometheus-kubernetes.yml"
elif grep -q "field kubernetes_sd_configs not found" <<<"$out"; then
    echo "note: this promtool lacks Kubernetes service discovery (Debian build): checking the rest"
    cp "$PROM/alerts.yml" "$TMP/alerts.yml"
    sed -e '/^    kubernetes_sd_configs:/,/^    relabel_configs:/{/^    relabel_configs:/!d}' \
        -e 's/^    relabel_configs:/    static_configs: [{targets: ["127.0.0.1:8888"]}]\n    relabel_configs:/' \
        "$PROM/prometheus-kubernetes.yml" >"$TMP/prometheus-kubernetes.yml"
    if (cd "$TMP" && promtool check config prometheus-kubernetes.yml); then
        pass "promtool check config prometheus-kubernetes.yml (discovery block swapped for a static target)"
    else fail "promtool check config prometheus-kubernetes.yml (without discovery)"; fi
else echo "$out"; fail "promtool check config prometheus-kubernetes.yml"; fi

say "grafana dashboard"
PY=$(pick_python)
if "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["schemaVersion"] >= 36 and d["panels"]' \
        "$GRAFANA/kgpool-dashboard.json"; then pass "dashboard JSON parses"; else fail "dashboard JSON"; fi
if "$PY" "$PROM/obscheck.py" dashboard "$GRAFANA/kgpool-dashboard.json"; then
    pass "dashboard structure (ids, grid, \${DS_PROMETHEUS} datasource, refIds)"
else fail "dashboard structure"; fi
if "$PY" "$GRAFANA/make_dashboard.py" --check; then pass "dashboard matches make_dashboard.py"
else fail "dashboard JSON out of date with make_dashboard.py"; fi
if "$PY" "$PROM/obscheck.py" queries "$GRAFANA/kgpool-dashboard.json" "$PROM/alerts.yml"; then
    pass "dashboard and alert queries use only contract metric names"
else fail "dashboard/alert queries name metrics outside the contract"; fi

# ---- a running kgpool -------------------------------------------------------------------------
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_kgpool() {
    local port
    port=$(free_port)
    URL="http://127.0.0.1:$port"
    echo "starting kgpool on $URL with deploy/notebooks/convert.ipynb ($PY)"
    "$PY" -m kgpool serve "$ROOT/deploy/notebooks/convert.ipynb" --kernels 1 --host 127.0.0.1 \
        --port "$port" --timeout 10 >"$TMP/kgpool.log" 2>&1 &
    KGPOOL_PID=$!
    for _ in $(seq 1 300); do
        if curl -fsS -o /dev/null "$URL/readyz" 2>/dev/null; then return 0; fi
        kill -0 "$KGPOOL_PID" 2>/dev/null || break
        sleep 0.2
    done
    tail -30 "$TMP/kgpool.log"
    return 1
}

say "kgpool /metrics"
if [[ -z "$URL" ]] && ! start_kgpool; then
    fail "kgpool did not become ready"
else
    # One request on a notebook route and one unknown path, so the labelled series exist.
    curl -sS -o /dev/null "$URL/convert?angle=180" || true
    curl -sS -o /dev/null "$URL/no-such-route" || true
    if curl -fsS "$URL/metrics" -o "$TMP/metrics.txt"; then
        echo "$(grep -c '^kgpool_' "$TMP/metrics.txt") kgpool_ samples from $URL/metrics"
        if promtool check metrics <"$TMP/metrics.txt"; then pass "promtool check metrics"
        else fail "promtool check metrics"; fi
        if "$PY" "$PROM/obscheck.py" exposition "$TMP/metrics.txt"; then
            pass "exposition has every contract family, type and label"
        else fail "exposition differs from contract-metrics.txt"; fi
    else
        fail "GET $URL/metrics"
    fi
fi

if [[ ${#FAILED[@]} -gt 0 ]]; then
    printf '\n%d check(s) FAILED:\n' "${#FAILED[@]}"
    printf '  - %s\n' "${FAILED[@]}"
    exit 1
fi
printf '\nall observability checks passed\n'
