#!/usr/bin/env bash
# Build deploy/Dockerfile with podman against a locally made Debian/Python 3.11 base image and
# smoke-test the image the way an orchestrator runs it: read-only root filesystem with a tmpfs
# /tmp, all capabilities dropped, port published on 127.0.0.1 only.
#
# Checks: GET /convert?angle=180 returns exactly {"convertedAngle": 3.141592653589793}; the
# image's HEALTHCHECK passes; the process is not root; KGPOOL_* environment variables reach
# `kgpool serve`; dumb-init is PID 1 with kgpool and its kernels below it; SIGTERM exits 0 and
# no process of the container outlives it; kgpool stops its kernels itself; a notebook mounted
# and named by KGPOOL_NOTEBOOK is served, and SIGTERM during a request lets it finish (200)
# while new ones get 503. Containers are always removed.
#
# For a root Debian bookworm machine with apt and PyPI but no image registry (CI here):
#   bash deploy/container-smoke.sh
# Env: WORK (podman storage, base rootfs, logs; default container/ in the test cache,
#   ~/.cache/kgpool-tests)  HOST_PORT (18931, and +1)
#      IMAGE (localhost/kgpool:ci)  BASE_TAG (localhost/python-standin:3.11-bookworm)
#      KERNELS (2)  STOP_TIMEOUT (45: seconds to wait for the drain, > --shutdown-timeout)
# Why each setting (runc, ulimits, a local base image): "Without Docker: podman" in
# deploy/README.md. From empty storage to a passing run takes about 90 s here; with the base
# image cached, a few seconds.
set -euo pipefail

cd "$(dirname "$0")/.."            # the build context is the repository root
WORK=${WORK:-${KGPOOL_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kgpool-tests}/container}
HOST_PORT=${HOST_PORT:-18931}
IMAGE=${IMAGE:-localhost/kgpool:ci}
BASE_TAG=${BASE_TAG:-localhost/python-standin:3.11-bookworm}
KERNELS=${KERNELS:-2}
STOP_TIMEOUT=${STOP_TIMEOUT:-45}
EXPECTED='{"convertedAngle": 3.141592653589793}'
mkdir -p "$WORK"

t0=$(date +%s.%N); tprev=$t0
step() {   # "== [total] (previous step) message"
  local now; now=$(date +%s.%N)
  awk -v n="$now" -v a="$t0" -v b="$tprev" -v m="$*" \
    'BEGIN{printf "== [%6.1fs total, last step %5.1fs] %s\n", n-a, n-b, m}'
  tprev=$now
}
fail() { echo "FAIL: $*" >&2; exit 1; }

# GET a URL on 127.0.0.1; prints "STATUS BODY". No curl needed.
http_get() {
  python3 - "$1" <<'PY'
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
except Exception as e:
    print(0, repr(e))
PY
}

# ---- 1. tools (~20 s on a fresh machine). crun cannot run on this host (cgroup v1/v2
#         hybrid), so runc is required.
step "tools: podman runc debootstrap"
if ! command -v podman >/dev/null || ! command -v runc >/dev/null \
   || ! command -v debootstrap >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  # Another job may hold the dpkg lock for a while; wait for it instead of failing.
  apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null
  apt-get -o DPkg::Lock::Timeout=300 install -y -q podman runc debootstrap >/dev/null
fi
podman --version

# ---- 2. engine config outside /etc: runc, and ulimits within the hard limits (no
#         CAP_SYS_RESOURCE here, so podman's default nofile/nproc=1048576 is refused).
nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
if [ "$nofile" = unlimited ] || [ "$nofile" -gt 1048576 ]; then nofile=1048576; fi
if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
export CONTAINERS_CONF="$WORK/containers.conf"
cat > "$CONTAINERS_CONF" <<CONF
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_STORAGE_CONF="$WORK/storage.conf"
cat > "$CONTAINERS_STORAGE_CONF" <<CONF
[storage]
driver = "overlay"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
CONF

# ---- 3. base image (~60 s, once per machine): Debian bookworm minbase + python3 3.11 + venv,
#         standing in for python:3.11-slim. The host's extra CA certificates go in because
#         HTTPS may leave through a TLS-inspecting proxy; without them pip in the build fails.
if ! podman image exists "$BASE_TAG"; then
  step "base image: debootstrap -> $BASE_TAG"
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
  rootfs="$WORK/rootfs"; rm -rf "$rootfs"
  debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv \
      bookworm "$rootfs" "$mirror" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import -q -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$BASE_TAG" >/dev/null
  rm -rf "$rootfs"
fi

# ---- 4. build. --format docker keeps HEALTHCHECK (the OCI format drops it).
step "build $IMAGE"
podman build -q --format docker --build-arg BASE_IMAGE="$BASE_TAG" \
    -f deploy/Dockerfile -t "$IMAGE" . > "$WORK/build.log" 2>&1 \
  || { cat "$WORK/build.log"; fail "podman build"; }
podman image inspect --format '{{.Id}} {{.Size}} bytes; healthcheck: {{.Config.Healthcheck.Test}}' "$IMAGE" \
  | cut -c1-220
[ -n "$(podman image inspect --format '{{.Config.Healthcheck}}' "$IMAGE")" ] || fail "image has no HEALTHCHECK"

# ---- 5. run it the way Kubernetes would (readOnlyRootFilesystem + emptyDir /tmp, no caps).
step "run (read-only rootfs, tmpfs /tmp, cap-drop ALL, KGPOOL_KERNELS=$KERNELS)"
name="kgpool-smoke-$$"
cid=""
cid2=""
cleanup() {
  for c in "$cid" "$cid2"; do
    if [ -n "$c" ]; then podman rm -f -t 3 "$c" >/dev/null 2>&1 || true; fi
  done
}
trap cleanup EXIT
# (SO_REUSEADDR, as servers use: connections of an earlier run may linger in TIME_WAIT)
for p in "$HOST_PORT" $((HOST_PORT + 1)); do
  python3 -c "import socket as S,sys; s=S.socket(); s.setsockopt(S.SOL_SOCKET, S.SO_REUSEADDR, 1); s.bind(('127.0.0.1', int(sys.argv[1])))" "$p" \
    || fail "port 127.0.0.1:$p is taken; set HOST_PORT (it and the next port are used)"
done
# (podman prints harmless "unable to get systemd connection" errors: no systemd timers here)
cid=$(podman run -d --name "$name" -p "127.0.0.1:${HOST_PORT}:8888" \
        --read-only --read-only-tmpfs=false --tmpfs /tmp:rw,mode=1777,size=64m \
        --cap-drop=ALL --security-opt=no-new-privileges \
        -e KGPOOL_KERNELS="$KERNELS" -e KGPOOL_SHUTDOWN_TIMEOUT=30 -e KGPOOL_LOG_LEVEL=info \
        "$IMAGE" 2>"$WORK/run.err") || { cat "$WORK/run.err"; fail "podman run"; }
base="http://127.0.0.1:${HOST_PORT}"
dump_logs() { echo "---- container logs"; podman logs "$cid" 2>&1 | tail -40 || true; }

running() { [ "$(podman inspect --format '{{.State.Running}}' "$cid" 2>/dev/null)" = true ]; }
# Poll PATH until it answers 200, for at most $2 seconds; fail at once if the container exits.
wait_200() {
  local path=$1 limit=$2 code _
  for _ in $(seq 1 $((limit * 4))); do
    read -r code _ < <(http_get "$base$path"); [ "$code" = 200 ] && return 0
    running || { dump_logs; fail "container exited while waiting for $path: $(podman inspect --format '{{.State.Status}} {{.State.ExitCode}}' "$cid")"; }
    sleep 0.25
  done
  dump_logs; fail "$path did not answer 200 within $limit s"
}
wait_200 /healthz 30
step "/healthz 200"

wait_200 /readyz 60      # kernels warm
step "/readyz 200 (kernels warm)"

# ---- 6. the bundled notebook answers, byte for byte.
read -r code body < <(http_get "$base/convert?angle=180")
echo "GET /convert?angle=180 -> $code $body"
[ "$code" = 200 ] || { dump_logs; fail "status $code"; }
[ "$body" = "$EXPECTED" ] || fail "body: expected $EXPECTED"

# KGPOOL_KERNELS came through the environment: the pool reports it.
desired=$(http_get "$base/metrics" | awk '/^kgpool_kernels_desired[{ ]/{s += $NF} END {print s}')
echo "kgpool_kernels_desired = $desired"
[ "${desired%.0}" = "$KERNELS" ] || fail "KGPOOL_KERNELS=$KERNELS not honoured (metric says '$desired')"
step "endpoint + env checks"

# ---- 7. HEALTHCHECK (run by hand: no systemd, so podman schedules no timer) and the user.
podman healthcheck run "$cid" 2>/dev/null || { dump_logs; fail "HEALTHCHECK unhealthy"; }
echo "HEALTHCHECK: healthy"
uid=$(podman exec "$cid" id -u)
[ "$uid" != 0 ] || fail "container runs as root"
echo "uid=$uid"

# ---- 8. process tree: dumb-init is PID 1, kgpool its child, the kernels below kgpool.
podman top "$cid" pid ppid user args > "$WORK/top.txt"
cat "$WORK/top.txt"
awk 'NR>1 && $1==1' "$WORK/top.txt" | grep -q dumb-init || fail "PID 1 is not dumb-init"
nkern=$(grep -c ipykernel "$WORK/top.txt" || true)
[ "$nkern" -ge "$KERNELS" ] || fail "expected $KERNELS kernel processes, saw $nkern"
# Host PIDs of everything in the container, to prove none survives the stop.
mapfile -t hpids < <(podman top "$cid" hpid | awk 'NR>1{print $1}')
echo "host pids: ${hpids[*]}"
# Nothing may be written outside /tmp (the root filesystem is read-only, so a write there
# fails; make sure nothing complained about it).
if podman logs "$cid" 2>&1 | grep -Ei 'read-only file system|permission denied'; then
  fail "something tried to write outside /tmp"
fi
step "healthcheck, uid, process tree"

# ---- 9. SIGTERM: graceful drain, exit code 0, nothing left behind.
podman kill --signal TERM "$cid" >/dev/null
ts=$(date +%s.%N)
# podman wait has no timeout of its own here; bound it.
code=$(timeout "$STOP_TIMEOUT" podman wait "$cid" 2>/dev/null || echo timeout)
awk -v n="$(date +%s.%N)" -v a="$ts" -v c="$code" 'BEGIN{printf "SIGTERM -> exited in %.1fs with code %s\n", n-a, c}'
podman logs "$cid" 2>&1 | tail -12
[ "$code" != timeout ] || fail "still running ${STOP_TIMEOUT}s after SIGTERM"
state=$(podman inspect --format '{{.State.Status}} {{.State.ExitCode}}' "$cid")
echo "state: $state"
[ "$state" = "exited 0" ] || fail "expected 'exited 0' after SIGTERM, got '$state'"
left=""
for p in "${hpids[@]}"; do
  if [ -d "/proc/$p" ]; then left="$left $p:$(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-60)"; fi
done
[ -z "$left" ] || fail "processes left behind:$left"
echo "no container process left on the host"
step "SIGTERM drain"

# ---- 10. kgpool itself stops its kernels (rather than the end of the container doing it):
#          under the image's dumb-init, a small supervisor starts `kgpool serve`, sends it
#          SIGTERM once warm, and then lists every process still alive in the container. A
#          kernel that kgpool failed to stop would be orphaned to PID 1 and show up here.
#          Also proves KGPOOL_LOG_FORMAT=json reaches kgpool (every log line must be JSON).
podman run --rm -i --read-only --read-only-tmpfs=false --tmpfs /tmp:rw,mode=1777,size=64m \
    --cap-drop=ALL -e KGPOOL_KERNELS="$KERNELS" -e KGPOOL_PORT=8899 -e KGPOOL_LOG_FORMAT=json \
    "$IMAGE" python - 2>"$WORK/run2.err" <<'PY' || { cat "$WORK/run2.err"; fail "kgpool left processes behind, exited non-zero or logged non-JSON"; }
import json, os, signal, subprocess, sys, time, urllib.request

def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()

def others():
    return {p: cmdline(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, os.getpid())}

# stderr to a file, not a pipe: the kernels inherit it, and reading a pipe to its end would
# wait for them too (ipykernel exits by itself soon after its parent dies).
log = open("/tmp/kgpool.log", "w+")
p = subprocess.Popen(["kgpool", "serve"], stderr=log)
for _ in range(240):
    try:
        if urllib.request.urlopen("http://127.0.0.1:8899/readyz", timeout=1).status == 200:
            break
    except Exception:
        time.sleep(0.25)
else:
    sys.exit("kgpool never became ready")
kernels = [c for c in others().values() if "ipykernel" in c]
p.send_signal(signal.SIGTERM)
p.wait(timeout=45)
left = others()          # at once: anything still here outlived kgpool
log.seek(0)
err = log.read().splitlines()
# Kernels share kgpool's stderr; their own "[IPKernelApp] ..." lines are not kgpool's.
json_lines = [json.loads(l) for l in err if l.startswith("{")]
other = [l for l in err if not l.startswith("{") and not l.startswith("[IPKernelApp]")]
print(f"kgpool exit code {p.returncode}; kernels before SIGTERM: {len(kernels)}; "
      f"processes left after: {left or 'none'}; JSON log lines: {len(json_lines)}, other: {other}")
sys.exit(1 if p.returncode != 0 or left or not kernels or not json_lines or other else 0)
PY
step "kgpool stops its own kernels; KGPOOL_LOG_FORMAT=json"

# ---- 11. a mounted notebook chosen by KGPOOL_NOTEBOOK, and SIGTERM while a request runs:
#          the running request still gets its answer, a new one gets 503, exit code 0.
nbdir="$WORK/notebooks"; mkdir -p "$nbdir"
cat > "$nbdir/slow.ipynb" <<'NB'
{"cells": [
 {"cell_type": "code", "execution_count": null, "id": "init", "metadata": {}, "outputs": [], "source": "import time"},
 {"cell_type": "code", "execution_count": null, "id": "slow", "metadata": {}, "outputs": [], "source": "# GET /slow\ntime.sleep(3)\nprint('done')"}
], "metadata": {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}, "nbformat": 4, "nbformat_minor": 5}
NB
chmod -R a+rX "$nbdir"
port2=$((HOST_PORT + 1))
cid2=$(podman run -d --name "$name-drain" -p "127.0.0.1:${port2}:8888" \
        --read-only --read-only-tmpfs=false --tmpfs /tmp:rw,mode=1777,size=64m --cap-drop=ALL \
        -v "$nbdir:/notebooks:ro" -e KGPOOL_NOTEBOOK=/notebooks/slow.ipynb -e KGPOOL_KERNELS=1 \
        "$IMAGE" 2>"$WORK/run3.err") || { cat "$WORK/run3.err"; fail "podman run (mounted notebook)"; }
cid_main=$cid; cid=$cid2; base="http://127.0.0.1:${port2}"
wait_200 /readyz 60
python3 - "$base" "$cid2" <<'PY' || { dump_logs; fail "drain under SIGTERM"; }
import subprocess, sys, threading, time, urllib.error, urllib.request
base, cid = sys.argv[1], sys.argv[2]
def get(path, box):
    try:
        with urllib.request.urlopen(base + path, timeout=30) as r:
            box.append((r.status, r.read().decode().strip()))
    except urllib.error.HTTPError as e:
        box.append((e.code, e.read().decode().strip()))
    except Exception as e:
        box.append((0, repr(e)))
running = []
t = threading.Thread(target=get, args=("/slow", running)); t.start()
time.sleep(1.0)                       # the request is now inside the kernel
t0 = time.monotonic()
subprocess.run(["podman", "kill", "--signal", "TERM", cid], check=True, capture_output=True)
time.sleep(0.3)
late = []; get("/slow", late)         # arrives while draining
t.join()
code = subprocess.run(["podman", "wait", cid], capture_output=True, text=True).stdout.strip()
print(f"running request -> {running[0]}; request during drain -> {late[0][0]}; "
      f"exit code {code} after {time.monotonic() - t0:.1f}s")
ok = running[0] == (200, "done") and late[0][0] in (503, 0) and code == "0"
sys.exit(0 if ok else 1)
PY
cid=$cid_main
step "mounted notebook via KGPOOL_NOTEBOOK; SIGTERM mid-request drains it"

# ---- 12. the image also runs the other CLI verbs (entrypoint does not force `serve`).
routes=$(podman run --rm --read-only "$IMAGE" kgpool routes /app/notebooks/convert.ipynb 2>/dev/null)
echo "$routes"
grep -q '/convert' <<<"$routes" || fail "kgpool routes did not list /convert"
step "PASS"
