"""kgpool vs Jupyter Kernel Gateway (notebook-http), side by side in one run.

Phases: start-to-ready times, a sweep of kernels x concurrency driven by wrk (the two servers
alternate inside every cell so machine noise hits both), and the raw jupyter_client floor.
Writes results/local/run-<time>.{md,png,json} (untracked); --name latest updates the committed
results/latest.*.  Says at the start how long the run will take, and at the end how long it
took.  Run through run.sh, which builds the virtualenvs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import math
import os
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import procs
import sections

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV_KG = HERE / ".venv-kg"
VENV_BENCH = Path(os.environ.get("KGBENCH_VENV") or HERE / ".venv-bench")  # set by run.sh
# kgpool at a baseline commit (KGPOOL_BASE=<commit> bash run.sh), measured in the same rotation
VENV_BASE = Path(os.environ.get("KGBENCH_BASE_VENV") or HERE / ".venv-bench-base")
RESULTS = HERE / "results"
LOCAL = RESULTS / "local"  # a run's results unless --name is given: not in git (.gitignore)
LOGS = RESULTS / "logs"
LUA = HERE / "check.lua"
EXPECTED = '{"convertedAngle": 3.141592653589793}\n'
PATH_Q = "/convert?angle=180"
# server kinds: kgpool with its default channel, kgpool with an explicit --channel, Kernel Gateway
KGPOOL_ARGS = {
    "kgpool": [],
    "kgpool-direct": ["--channel", "direct"],
    "kgpool-jupyter": ["--channel", "jupyter"],
    "base-direct": ["--channel", "direct"],
    "base-jupyter": ["--channel", "jupyter"],
}
# aiohttp hello-world answering the same body (hello.py): the framework's ceiling (issue 18)
HELLO = "aiohttp-hello"
SERVERS = (*KGPOOL_ARGS, "kg", HELLO)

DEV_NOTEBOOK = {
    "cells": [
        {
            "cell_type": "code",
            "execution_count": None,
            "metadata": {},
            "outputs": [],
            "source": ["import math\n", "import json"],
        },
        {
            "cell_type": "code",
            "execution_count": None,
            "metadata": {},
            "outputs": [],
            "source": [
                "# GET /convert\n",
                "req = json.loads(REQUEST)\n",
                "angle = req['args']['angle'][0]\n",
                "print(json.dumps({'convertedAngle': math.radians(float(angle))}))",
            ],
        },
    ],
    "metadata": {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    },
    "nbformat": 4,
    "nbformat_minor": 5,
}


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


def output_base(name: str | None, kind: str) -> Path:
    """results/NAME (committed results are only ever written when asked for by name), else a
    new results/local/KIND-<time>."""
    if name:
        return RESULTS / name
    return LOCAL / f"{kind}-{dt.datetime.now():%Y%m%d-%H%M%S}"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def estimate(args, servers: list[str]) -> dict[str, float]:
    """Seconds each phase should take on an idle machine, from the options: measured runs plus
    a start (and stop) per server, warm-ups and floor.py's kernels. Calibrated on this repo's
    committed runs (2 cores), within 10 %."""
    skip = set(args.skip.split(","))
    start = lambda k: 1.5 + 0.3 * k  # noqa: E731  start to all warm, and the stop
    run = args.duration + 0.1
    n = len(servers)
    with_kernels = len([s for s in servers if s != HELLO])  # the hello-world starts in ~0.5 s
    out = {"setup": 3.0}
    if "startup" not in skip:
        out["startup"] = (args.startup_reps * with_kernels
                          * sum(start(k) for k in args.startup_kernels))
    if "sweep" not in skip:
        inline = 0 if "inline-floor" in skip or args.floor_kernels not in args.kernels else \
            len(set(args.floor_concurrency) & set(args.concurrency))
        out["sweep"] = (with_kernels * sum(start(k) + args.warmup + 0.5 for k in args.kernels)
                        + (n - with_kernels) * len(args.kernels) * (1.0 + args.warmup + 0.5)
                        + len(args.kernels) * len(args.concurrency) * args.rounds * n * run
                        + inline * args.rounds * (args.duration + 1.5))
    if "floor" not in skip:
        out["floor"] = 1.5 + 3 * len(args.floor_concurrency) * (args.floor_duration + 0.2)
    return out


def notebook_path() -> tuple[Path, bool]:
    nb = REPO / "deploy" / "notebooks" / "convert.ipynb"
    if nb.exists():
        return nb, False
    dev = HERE / ".convert-dev.ipynb"
    dev.write_text(json.dumps(DEV_NOTEBOOK, indent=1))
    return dev, True


def repo_relative(path: str) -> str:
    """`path` relative to the repo when it lies inside it, else unchanged."""
    try:
        return str(Path(path).relative_to(REPO))
    except ValueError:
        return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (OSError, urllib.error.URLError):
        return 0, ""


class Server:
    """One kgpool or Kernel Gateway process on a fresh port."""

    def __init__(self, kind: str, notebook: Path, kernels: int, tag: str):
        self.kind, self.kernels = kind, kernels
        self.port = free_port()
        self.runtime = tempfile.mkdtemp(prefix=f"kgbench-{kind}-")
        env = dict(os.environ, JUPYTER_RUNTIME_DIR=self.runtime, PYTHONUNBUFFERED="1")
        if kind in KGPOOL_ARGS:
            venv = VENV_BASE if kind.startswith("base-") else VENV_BENCH
            cmd = [
                str(venv / "bin" / "kgpool"),
                "serve",
                str(notebook),
                "--kernels",
                str(kernels),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *KGPOOL_ARGS[kind],
            ]
            env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
        elif kind == HELLO:
            cmd = [str(VENV_BENCH / "bin" / "python"), str(HERE / "hello.py"), "--port",
                   str(self.port)]
        else:
            cmd = [
                str(VENV_KG / "bin" / "jupyter-kernelgateway"),
                "--KernelGatewayApp.api=kernel_gateway.notebook_http",
                f"--KernelGatewayApp.seed_uri={notebook}",
                "--KernelGatewayApp.ip=127.0.0.1",
                f"--KernelGatewayApp.port={self.port}",
                f"--KernelGatewayApp.prespawn_count={kernels}",
            ]
            env["PATH"] = f"{VENV_KG / 'bin'}:{env.get('PATH', '')}"
        self.proc = procs.Managed(
            f"{kind}-k{kernels}", cmd, str(LOGS / f"{tag}-{kind}-k{kernels}.log"), env
        )
        self.t0 = self.proc.t0
        self.ready_s: float | None = None
        self.first_body_s: float | None = None
        self.all_warm_s: float | None = None

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Poll until ready; records seconds from process start.

        kgpool: /readyz 200 (ready_s), then the first correct /convert body (first_body_s) and
        kgpool_kernels{state="idle"} >= K in /metrics (all_warm_s).  Kernel Gateway has no
        readiness endpoint and answers only once every prespawned kernel is seeded, so ready_s =
        first_body_s = all_warm_s = first correct /convert body.
        """
        deadline = self.t0 + timeout
        while time.monotonic() < deadline:
            if not self.proc.running():
                raise RuntimeError(
                    f"{self.kind} exited with {self.proc.proc.returncode}; see {self.proc.log_path}"
                )
            if self.kind in KGPOOL_ARGS:
                if self.ready_s is None and http_get(self.port, "/readyz", 1.0)[0] == 200:
                    self.ready_s = time.monotonic() - self.t0
                if self.ready_s is not None and self.first_body_s is None:
                    st, body = http_get(self.port, PATH_Q, 5.0)
                    if st == 200:
                        self.first_body_s = time.monotonic() - self.t0
                        if body != EXPECTED:
                            log(f"WARNING kgpool first body {body!r} != {EXPECTED!r}")
                if self.first_body_s is not None:
                    warm = self._idle_kernels()
                    if warm is None or warm >= self.kernels:
                        self.all_warm_s = time.monotonic() - self.t0 if warm is not None else None
                        self.proc.refresh()
                        return
            else:  # Kernel Gateway, aiohttp-hello: the first correct body
                st, body = http_get(self.port, PATH_Q, 5.0)
                if st == 200 and body == EXPECTED:
                    self.ready_s = self.first_body_s = self.all_warm_s = time.monotonic() - self.t0
                    self.proc.refresh()
                    return
                if st == 200:
                    raise RuntimeError(f"{self.kind} answered {body!r}, expected {EXPECTED!r}")
            time.sleep(0.02)
        raise RuntimeError(f"{self.kind} not ready after {timeout} s; see {self.proc.log_path}")

    def _idle_kernels(self) -> int | None:
        st, text = http_get(self.port, "/metrics", 2.0)
        if st != 200:
            return None
        # summed over label sets: newer kgpool adds a notebook label
        vals = re.findall(r"^kgpool_kernels\{([^}]*)\}\s+([0-9.e+]+)", text, re.M)
        idle = [float(v) for labels, v in vals if 'state="idle"' in labels]
        return int(sum(idle)) if idle else None

    def kernel_exes(self) -> list[str]:
        """The kernels' executables, relative to the repo (written results hold no /work/...)."""
        self.proc.refresh()
        return sorted(
            {repo_relative(procs.cmdline(k[0])[0]) for k in self.proc.kernel_keys()
             if procs.cmdline(k[0])}
        )

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.runtime, ignore_errors=True)


STOPS: list[dict] = []


def stop(server: Server) -> None:
    server.stop()
    if server.proc.stop_info:
        STOPS.append({"server": server.kind, "kernels": server.kernels, **server.proc.stop_info})


def probe_varied(port: int, n: int = 200, conc: int = 8) -> dict:
    """Distinct angles from concurrent clients, each body checked: wrk's constant URL cannot see a
    response cached or crossed between requests."""
    rnd = random.Random(port)
    angles = [
        str(rnd.choice([rnd.randint(-720, 720), round(rnd.uniform(-1000, 1000), 3)]))
        for _ in range(n)
    ]

    def one(angle: str) -> tuple[str, int, str]:
        st, body = http_get(port, f"/convert?angle={angle}", 10.0)
        return angle, st, body

    bad = []
    with concurrent.futures.ThreadPoolExecutor(conc) as pool:
        for angle, st, body in pool.map(one, angles):
            want = json.dumps({"convertedAngle": math.radians(float(angle))}) + "\n"
            if st != 200 or body != want:
                bad.append({"angle": angle, "status": st, "body": body[:200], "expected": want})
    return {"requests": n, "bad": len(bad), "samples": bad[:3]}


def run_wrk(port: int, conc: int, duration: float, threads: int) -> dict:
    t = max(1, min(threads, conc))
    secs = max(1, round(duration))  # wrk takes whole seconds
    cmd = [
        "wrk",
        "-t",
        str(t),
        "-c",
        str(conc),
        "-d",
        f"{secs}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{port}{PATH_Q}",
        "--",
        EXPECTED,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[8:])
    raise RuntimeError(f"wrk gave no result: {out.stdout}\n{out.stderr}")


def busy_ms() -> float:
    """Machine-wide busy CPU (all cores) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v[:8]) - idle) * 1000.0 / procs.CLK_TCK


def children_cpu_ms() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (ru.ru_utime + ru.ru_stime) * 1000.0


def measure(server: Server, conc: int, duration: float, threads: int) -> dict:
    before = server.proc.snapshot()
    busy0, kids0, t0 = busy_ms(), children_cpu_ms(), time.monotonic()
    w = run_wrk(server.port, conc, duration, threads)
    busy1, kids1, wall = busy_ms(), children_cpu_ms(), time.monotonic() - t0
    after = server.proc.snapshot()
    srv_ms, ker_ms = procs.cpu_ms(before, after)
    wrk_ms = kids1 - kids0  # wrk is the only child reaped meanwhile
    others = max(0.0, (busy1 - busy0) - srv_ms - ker_ms - wrk_ms)
    e = w["socket_errors"]
    lat = w["latency_us"]
    return {
        "server": server.kind,
        "kernels": server.kernels,
        "concurrency": conc,
        "requests": w["requests"],
        "duration_s": w["duration_us"] / 1e6,
        "p50_ms": lat["p50"] / 1000,
        "p90_ms": lat["p90"] / 1000,
        "p99_ms": lat["p99"] / 1000,
        "max_ms": lat["max"] / 1000,
        "non2xx": w["non2xx"],
        "wrong_bodies": w["wrong_bodies"],
        "socket_errors": e["connect"] + e["read"] + e["write"] + e["timeout"],
        "errors": w["non2xx"] + e["connect"] + e["read"] + e["write"] + e["timeout"],
        "checked": w["checked"],
        "sample_bad": [w["sample_bad_status"], w["sample_bad_body"]]
        if w["sample_bad_body"] or w["sample_bad_status"]
        else None,
        "server_cpu_ms": srv_ms,
        "kernel_cpu_ms": ker_ms,
        "wrk_cpu_ms": wrk_ms,
        "others_cpu_pct": 100.0 * others / 1000.0 / wall / (os.cpu_count() or 1),
        "server_rss_mb": after.server_rss_kb / 1024,
        "kernel_rss_mb": after.kernel_rss_kb / 1024,
        "kernel_procs": len(after.kernel_ticks),
        "loadavg": os.getloadavg()[0],
    }


def merge(rounds: list[dict]) -> dict:
    """One row from the rounds of a cell: sums for counts, medians for percentiles."""
    r = dict(rounds[0])
    n = sum(x["requests"] for x in rounds)
    secs = sum(x["duration_s"] for x in rounds)
    for key in (
        "requests",
        "non2xx",
        "wrong_bodies",
        "socket_errors",
        "errors",
        "checked",
        "server_cpu_ms",
        "kernel_cpu_ms",
        "wrk_cpu_ms",
        "duration_s",
    ):
        r[key] = sum(x[key] for x in rounds)
    for key in ("p50_ms", "p90_ms", "p99_ms", "others_cpu_pct", "loadavg"):
        r[key] = statistics.median(x[key] for x in rounds)
    for key in ("max_ms", "server_rss_mb", "kernel_rss_mb"):
        r[key] = max(x[key] for x in rounds)
    r["rps"] = n / secs if secs else 0.0
    r["server_cpu_ms_per_req"] = r["server_cpu_ms"] / max(1, n)
    r["kernel_cpu_ms_per_req"] = r["kernel_cpu_ms"] / max(1, n)
    r["sample_bad"] = next((x["sample_bad"] for x in rounds if x["sample_bad"]), None)
    r["rounds"] = [
        {
            k: x[k]
            for k in (
                "requests",
                "duration_s",
                "p50_ms",
                "p99_ms",
                "errors",
                "wrong_bodies",
                "others_cpu_pct",
                "order",
            )
        }
        for x in rounds
    ]
    return r


def phase_startup(args, nb: Path, servers: list[str]) -> list[dict]:
    out = []
    servers = [s for s in servers if s != HELLO]  # no kernels to start
    for k in args.startup_kernels:
        for rep in range(args.startup_reps):
            order = servers if rep % 2 == 0 else servers[::-1]
            for kind in order:
                s = Server(kind, nb, k, f"startup-r{rep}")
                try:
                    s.wait_ready()
                    out.append(
                        {
                            "server": kind,
                            "kernels": k,
                            "rep": rep,
                            "ready_s": s.ready_s,
                            "first_body_s": s.first_body_s,
                            "all_warm_s": s.all_warm_s,
                        }
                    )
                    log(
                        f"startup {kind} K={k} rep={rep}: ready {s.ready_s:.2f}s "
                        f"first body {s.first_body_s:.2f}s all warm "
                        + (f"{s.all_warm_s:.2f}s" if s.all_warm_s is not None else "unknown")
                    )
                finally:
                    stop(s)
    return out


def phase_sweep(
    args, nb: Path, servers: list[str], floor_rows: list[dict], probes: list[dict]
) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    exes: dict[str, list[str]] = {}
    for k in args.kernels:
        live: dict[str, Server] = {}
        try:
            for kind in servers:
                live[kind] = Server(kind, nb, k, "sweep")
                live[kind].wait_ready()
                if kind != HELLO:
                    exes[kind] = live[kind].kernel_exes()
                log(
                    f"sweep K={k}: {kind} ready in {live[kind].ready_s:.2f}s on port "
                    f"{live[kind].port}"
                )
            for kind in servers:  # warm-up, discarded; then a check with distinct angles
                run_wrk(live[kind].port, max(4, k), args.warmup, args.threads)
                if kind == HELLO:  # answers one constant body: nothing to cross
                    continue
                pv = probe_varied(live[kind].port)
                probes.append({"server": kind, "kernels": k, **pv})
                if pv["bad"]:
                    log(
                        f"WRONG: {kind} K={k} answered {pv['bad']}/{pv['requests']} "
                        "distinct angles wrongly: "
                        f"{pv['samples'][:1]}"
                    )
            for i, c in enumerate(args.concurrency):
                got: dict[str, list[dict]] = {kind: [] for kind in servers}
                with_floor = (
                    k == args.floor_kernels
                    and c in args.floor_concurrency
                    and "inline-floor" not in args.skip
                )
                fl: list[dict] = []
                for rnd in range(args.rounds):  # A B, then B A: drift and bursts hit both
                    order = list(servers) + (["floor"] if with_floor else [])
                    order = order if (i + rnd) % 2 == 0 else order[::-1]
                    for kind in order:
                        if kind == "floor":
                            f = inline_floor(args, c, rnd)
                            if f:
                                fl.append(f)
                            continue
                        m = measure(live[kind], c, args.duration, args.threads)
                        m["order"] = order.index(kind)
                        got[kind].append(m)
                        if m["kernel_procs"] != (0 if kind == HELLO else k):
                            log(
                                f"WARNING {kind} has {m['kernel_procs']} kernel processes, "
                                f"expected {k}"
                            )
                if fl:
                    n = sum(f["requests"] for f in fl)
                    rps = n / sum(f["requests"] / f["rps"] for f in fl)
                    floor_rows.append(
                        {
                            "kernels": k,
                            "concurrency": c,
                            "mode": "one",
                            "rps": rps,
                            "p50_ms": statistics.median(f["p50_ms"] for f in fl),
                            "p99_ms": statistics.median(f["p99_ms"] for f in fl),
                            "errors": sum(f["errors"] for f in fl),
                            "wrong_bodies": sum(f["wrong_bodies"] for f in fl),
                            "rounds": fl,
                        }
                    )
                    log(
                        f"K={k} c={c:<3} {'floor':<14} {rps:8.1f} req/s  p50 "
                        f"{floor_rows[-1]['p50_ms']:7.2f} ms "
                        "(jupyter_client, one execute, in rotation)"
                    )
                for kind in servers:
                    r = merge(got[kind])
                    rows.append(r)
                    log(
                        f"K={k} c={c:<3} {kind:<14} {r['rps']:8.1f} req/s  p50 "
                        f"{r['p50_ms']:7.2f} ms  "
                        f"p99 {r['p99_ms']:7.2f} ms  err {r['errors']} wrong {r['wrong_bodies']}  "
                        f"cpu srv {r['server_cpu_ms_per_req']:.2f} ker "
                        f"{r['kernel_cpu_ms_per_req']:.2f} ms/req  "
                        f"others {r['others_cpu_pct']:.0f}%"
                        + (f"  BAD SAMPLE {r['sample_bad']}" if r["sample_bad"] else "")
                    )
        finally:
            for s in live.values():
                stop(s)
    return rows, exes


def run_floor(args, modes: str, concs: list[int], duration: int, tag: str) -> dict | None:
    """Runs floor.py (its own kernels, in its own session); returns its JSON or None."""
    py = VENV_KG / "bin" / "python"
    cmd = [
        str(py),
        str(HERE / "floor.py"),
        "--kernels",
        str(args.floor_kernels),
        "--modes",
        modes,
        "--concurrency",
        ",".join(map(str, concs)),
        "--duration",
        str(duration),
    ]
    m = procs.Managed("floor", cmd, str(LOGS / f"{tag}.log"))
    # stdout and stderr both go to the log; the final line is the JSON result
    try:
        deadline = time.monotonic() + len(modes.split(",")) * len(concs) * (duration + 2) + 120
        while m.running() and time.monotonic() < deadline:
            m.refresh()
            time.sleep(0.2)
        if m.running():
            raise RuntimeError("floor.py timed out")
    finally:
        m.stop()
    for line in reversed(Path(m.log_path).read_text().splitlines()):
        if line.startswith('{"results"'):
            return json.loads(line)
    log(f"floor.py failed (exit {m.proc.returncode}); see {m.log_path}")
    return None


def phase_floor(args) -> dict | None:
    return run_floor(args, "two,one,pass", args.floor_concurrency, args.floor_duration, "floor")


def inline_floor(args, c: int, rnd: int) -> dict | None:
    """The one-execute floor for one sweep cell, run in the same A B F / F B A rotation."""
    out = run_floor(args, "one", [c], args.duration, f"floor-inline-c{c}-r{rnd}")
    return out["results"][0] if out else None


def versions() -> dict:
    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    probe = "import importlib.metadata as m; print(' '.join(p + '=' + m.version(p) for p in %r))"
    v = {
        "kg_venv": run(
            [
                str(VENV_KG / "bin" / "python"),
                "-c",
                probe
                % ["jupyter_kernel_gateway", "jupyter_client", "ipykernel", "tornado", "pyzmq"],
            ]
        ),
        "wrk": " ".join(run(["wrk", "--version"]).split()[:2]),
        "python": sys.version.split()[0],
        "git": run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "dirty": bool(
            run(["git", "-C", str(REPO), "status", "--porcelain", "--", "kgpool", "pyproject.toml"])
        ),
    }
    if (VENV_BENCH / "bin" / "kgpool").exists():
        v["kgpool"] = run([str(VENV_BENCH / "bin" / "kgpool"), "--version"])
        v["kgpool_source"] = os.environ.get("KGBENCH_KGPOOL_DESC") or (
            f"working tree {v['git']}" + (" + uncommitted changes" if v["dirty"] else "")
        )
        v["bench_venv"] = run(
            [
                str(VENV_BENCH / "bin" / "python"),
                "-c",
                probe % ["jupyter_client", "ipykernel", "pyzmq"],
            ]
        )
    if os.environ.get("KGBENCH_BASE_DESC"):
        v["baseline_source"] = os.environ["KGBENCH_BASE_DESC"]
    return v


def pick_servers(spec: str) -> list[str]:
    exe = VENV_BENCH / "bin" / "kgpool"
    if spec == "auto":
        spec = "kgpool,kg"
        if exe.exists():
            helptext = subprocess.run(
                [str(exe), "serve", "--help"], capture_output=True, text=True
            ).stdout
            if "--channel" in helptext:
                spec = f"kgpool-direct,kgpool-jupyter,kg,{HELLO}"
    servers = [s for s in spec.split(",") if s in SERVERS]
    if not (VENV_BASE / "bin" / "kgpool").exists() and any(s.startswith("base-") for s in servers):
        log("no baseline kgpool (KGPOOL_BASE=<commit> bash benchmarks/run.sh): skipping base-*")
        servers = [s for s in servers if not s.startswith("base-")]
    if not exe.exists() and any(s in KGPOOL_ARGS for s in servers):
        log("kgpool is not installed in .venv-bench: measuring Kernel Gateway only")
        servers = [s for s in servers if s not in KGPOOL_ARGS]
    return servers


def parse_args(argv: list[str]) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--quick", action="store_true", help="K=1,2  c=1,16  one 3 s run per cell, 1 start-up rep"
    )
    p.add_argument("--kernels", type=ints, default=None, help="kernel counts (default 1,2,4)")
    p.add_argument(
        "--concurrency", type=ints, default=None, help="wrk connections (default 1,4,16,64)"
    )
    p.add_argument(
        "--duration", type=int, default=None, help="seconds per measured run (default 4)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="measured runs per server and cell, order alternating A B / B A (default 2; quick 1)",
    )
    p.add_argument(
        "--warmup", type=int, default=2, help="seconds of discarded load per server and K"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="wrk threads (default 1: leave the cores to the servers)",
    )
    p.add_argument("--startup-kernels", type=ints, default=[1, 4])
    p.add_argument(
        "--startup-reps",
        type=int,
        default=None,
        help="start-up measurements per server and K (default 3)",
    )
    p.add_argument("--floor-kernels", type=int, default=2)
    p.add_argument("--floor-concurrency", type=ints, default=[1, 16])
    p.add_argument("--floor-duration", type=float, default=None)
    p.add_argument(
        "--servers",
        default="auto",
        help="comma list from kgpool, kgpool-direct, kgpool-jupyter, base-direct, base-jupyter "
        "(kgpool at KGPOOL_BASE), kg, aiohttp-hello (hello.py: the framework's ceiling, "
        "answering the same body); auto = kgpool-direct,kgpool-jupyter,kg,aiohttp-hello when "
        "kgpool has --channel, else kgpool,kg",
    )
    p.add_argument(
        "--name",
        default=None,
        help="write results/NAME.{md,png,json}: `--name latest` updates the committed results "
        "(default: results/local/run-<time>.*, not in git)",
    )
    p.add_argument(
        "--include",
        default="",
        help="the other benchmarks' results the report summarises, as kind=NAME for "
        "results/NAME.json: fork (default issue15-fork), serving (default serving), soak "
        "(default soak); `soak=` leaves one out; missing files are left out",
    )
    p.add_argument(
        "--skip",
        default="",
        help="phases to skip: startup, sweep, floor (the separate floor phase), inline-floor",
    )
    a = p.parse_args(argv)
    try:
        sections.included(a.include)
    except ValueError as exc:
        p.error(str(exc))
    q = a.quick
    a.kernels = a.kernels or ([1, 2] if q else [1, 2, 4])
    a.concurrency = a.concurrency or ([1, 16] if q else [1, 4, 16, 64])
    a.duration = a.duration or (3 if q else 4)
    a.rounds = a.rounds or (1 if q else 2)
    a.startup_reps = a.startup_reps or (1 if q else 3)
    a.floor_duration = a.floor_duration or a.duration
    if q:
        a.warmup = min(a.warmup, 1)
    return a


def main(argv: list[str]) -> int:
    began = time.monotonic()
    args = parse_args(argv)
    shutil.rmtree(LOGS, ignore_errors=True)  # logs of this run only
    LOGS.mkdir(parents=True, exist_ok=True)
    nb, dev_nb = notebook_path()
    servers = pick_servers(args.servers)
    skip = set(args.skip.split(","))
    started = dt.datetime.now(dt.UTC)
    result: dict = {
        "started": started.isoformat(timespec="seconds"),
        "args": vars(args),
        "notebook": str(nb.relative_to(REPO)),
        "dev_notebook": dev_nb,
        "servers": servers,
        "cores": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "versions": versions(),
        "expected_body": EXPECTED,
        "command": " ".join(
            [f"{v}={os.environ[v]}" for v in ("KGPOOL_REF", "KGPOOL_BASE") if os.environ.get(v)]
            + ["bash", "benchmarks/run.sh", *argv]
        ),
    }
    log(
        f"notebook {result['notebook']}; servers {servers}; kernels {args.kernels}; "
        f"concurrency {args.concurrency}; {args.duration}s per run"
    )
    planned = estimate(args, servers)
    log(
        f"this run takes about {minutes(sum(planned.values()))} on an idle machine ("
        + ", ".join(f"{phase} {minutes(s)}" for phase, s in planned.items() if phase != "setup")
        + "); longer when the machine is busy"
    )
    result["startup"] = [] if "startup" in skip else phase_startup(args, nb, servers)
    result["floor_inline"], result["varied_probe"] = [], []
    result["sweep"], result["kernel_executables"] = (
        ([], {})
        if "sweep" in skip
        else phase_sweep(args, nb, servers, result["floor_inline"], result["varied_probe"])
    )
    result["floor"] = None if "floor" in skip else phase_floor(args)
    result["loadavg_end"] = os.getloadavg()
    result["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result["leftover_processes"] = procs.leftovers()
    result["stops"] = STOPS

    import report  # matplotlib is imported lazily: the sweep must not depend on it

    base = output_base(args.name, "run")
    base.parent.mkdir(parents=True, exist_ok=True)
    result["estimated_s"] = round(sum(planned.values()))
    result["seconds"] = round(time.monotonic() - began)
    result["included"] = sections.included(args.include)  # the latest of each, at the end
    base.parent.joinpath(base.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
    base.parent.joinpath(base.name + ".md").write_text(
        report.markdown(result, base.parent / (base.name + ".md"))
    )
    try:
        report.plot(result, base.parent / (base.name + ".png"))
    except Exception as exc:  # noqa: BLE001 - the table is the result; the plot is a view of it
        log(f"plot failed: {exc}")
    log(f"wrote {base.relative_to(REPO)}.md, .png, .json")
    log(
        f"took {minutes(result['seconds'])} (estimated {minutes(result['estimated_s'])}; "
        f"load average {result['loadavg_start'][0]:.1f} at the start)"
    )
    if result["leftover_processes"]:
        log(f"ERROR: processes left behind: {result['leftover_processes']}")
        return 1
    return 0


if __name__ == "__main__":
    procs.run_main(main, log)
