"""Soak: many requests to one kgpool on the bundled notebook, memory sampled along the way.

    bash benchmarks/run.sh soak                     # 200,000 requests, 2 kernels, c=64, direct
    bash benchmarks/run.sh soak --requests 30000 --channel jupyter
    bash benchmarks/run.sh soak --name soak         # updates the committed results/soak.*

`kgpool serve deploy/notebooks/convert.ipynb` (bench venv) on a free 127.0.0.1 port; once
/readyz answers and every kernel is idle, wrk (one thread: the cores are the server's) drives
`GET /convert?angle=180` in slices, check.lua comparing every body with the expected bytes.
wrk runs for whole seconds, not for a request count, so each slice's length is computed from
the rate so far to end near the next multiple of --sample-every requests; the samples say how
many requests had been served. After every slice, with the server idle: RSS and PSS
(/proc/PID/smaps_rollup) of the server process (and any non-kernel descendants) and the sums
over its kernels, their pids (a replaced kernel would fake a drop), CPU used. Growth per
10,000 requests: a least-squares slope over the samples past --warmup requests, and first
sample to last. Each slice opens its connections anew (wrk's), so connection set-up and
teardown are soaked too. At the end, 200 requests with distinct angles check that no answer
was cached or crossed.

Bounded: aborts after --max-minutes (15), writes what it has and exits 1. The server is
stopped by pid (procs.py); nothing is left. Writes results/local/soak-<time>.{md,json} (not in
git) or, with --name NAME, results/NAME.{md,json}. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import time

import procs
from bench import (
    EXPECTED,
    LOGS,
    LUA,
    PATH_Q,
    REPO,
    Server,
    log,
    minutes,
    notebook_path,
    output_base,
    probe_varied,
    repo_relative,
    versions,
)

MB = 1024.0
GUESS_RPS = 2500.0  # for the estimate printed before the first slice


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def wrk_slice(port: int, conc: int, secs: int, threads: int) -> dict:
    cmd = ["wrk", "-t", str(max(1, min(threads, conc))), "-c", str(conc), "-d", f"{secs}s",
           "--timeout", "10s", "-s", str(LUA), f"http://127.0.0.1:{port}{PATH_Q}", "--",
           EXPECTED]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[8:])
    raise RuntimeError(f"wrk gave no result: {out.stdout}\n{out.stderr}")


def memory(server: Server) -> dict:
    snap = server.proc.snapshot()
    return {
        "server_rss_mb": round(snap.server_rss_kb / MB, 2),
        "server_pss_mb": round(sum(pss_kb(k[0]) for k in snap.server_ticks) / MB, 2),
        "kernels_rss_mb": round(snap.kernel_rss_kb / MB, 2),
        "kernels_pss_mb": round(sum(pss_kb(k[0]) for k in snap.kernel_ticks) / MB, 2),
        "kernel_pids": sorted(k[0] for k in snap.kernel_ticks),
        "_snap": snap,
    }


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys against xs, None with fewer than two distinct xs."""
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else None


def growth(samples: list[dict], warmup: int) -> dict:
    """Per memory figure: first and last sample, MB per 10,000 requests fitted over the samples
    past `warmup` requests, and first sample to last per 10,000 requests."""
    out = {}
    late = [s for s in samples if s["requests"] >= warmup]
    for key in ("server_rss_mb", "server_pss_mb", "kernels_rss_mb", "kernels_pss_mb"):
        if not samples:
            break
        a, b = samples[0], samples[-1]
        fit = slope([s["requests"] for s in late], [s[key] for s in late])
        span = b["requests"] - a["requests"]
        out[key] = {"first": a[key], "last": b[key],
                    "slope_per_10k": None if fit is None else round(fit * 1e4, 3),
                    "first_last_per_10k": round((b[key] - a[key]) / span * 1e4, 3)
                    if span else None}
    return out


def add_slice(totals: dict, w: dict, srv_ms: float, ker_ms: float) -> dict:
    """Adds one wrk slice to the totals; returns its sample (without memory yet)."""
    e = w["socket_errors"]
    sock = e["connect"] + e["read"] + e["write"] + e["timeout"]
    totals["requests"] += w["requests"]
    totals["seconds"] += w["duration_us"] / 1e6
    for key, val in (("non2xx", w["non2xx"]), ("socket_errors", sock),
                     ("wrong_bodies", w["wrong_bodies"]), ("checked", w["checked"]),
                     ("server_cpu_ms", srv_ms), ("kernel_cpu_ms", ker_ms)):
        totals[key] += val
    return {"requests": totals["requests"], "slice_requests": w["requests"],
            "slice_rps": round(w["requests"] / max(1e-9, w["duration_us"] / 1e6), 1),
            "p50_ms": w["latency_us"]["p50"] / 1000, "p99_ms": w["latency_us"]["p99"] / 1000,
            "errors": w["non2xx"] + sock, "wrong_bodies": w["wrong_bodies"]}


def soak(args: argparse.Namespace, server: Server, deadline: float) -> dict:
    """The slices, until --requests are served or the deadline passes."""
    samples: list[dict] = []
    totals = {"requests": 0, "seconds": 0.0, "non2xx": 0, "socket_errors": 0,
              "wrong_bodies": 0, "checked": 0, "server_cpu_ms": 0.0, "kernel_cpu_ms": 0.0}
    prev = memory(server)
    aborted = None
    while totals["requests"] < args.requests:
        done = totals["requests"]
        rate = samples[-1]["slice_rps"] if samples else None  # the latest: follows the load
        mark = (done // args.sample_every + 1) * args.sample_every
        if mark - done < args.sample_every // 4:  # just short of a mark: on to the next one
            mark += args.sample_every
        mark = min(args.requests, mark)
        secs = 2 if rate is None else max(1, round((mark - done) / max(rate, 1.0)))
        if time.monotonic() + secs > deadline:
            aborted = f"over {args.max_minutes:g} min at {done} requests"
            break
        w = wrk_slice(server.port, args.concurrency, secs, args.threads)
        mem = memory(server)
        srv_ms, ker_ms = procs.cpu_ms(prev.pop("_snap"), mem["_snap"])
        sample = add_slice(totals, w, srv_ms, ker_ms)
        if not server.proc.running() or not w["requests"]:
            aborted = (f"the server exited (see {repo_relative(server.proc.log_path)})" if not
                       server.proc.running() else f"no answer in {secs} s at {done} requests")
            break
        sample.update({k: v for k, v in mem.items() if k != "_snap"},
                      kernels_changed=mem["kernel_pids"] != prev["kernel_pids"])
        samples.append(sample)
        prev = mem
        log(f"{sample['requests']:>7} req  {sample['slice_rps']:7.0f} req/s  p99 "
            f"{sample['p99_ms']:6.1f} ms  err {sample['errors']} wrong {sample['wrong_bodies']}"
            f"  server RSS {sample['server_rss_mb']:.1f} PSS {sample['server_pss_mb']:.1f} MB"
            f"  kernels RSS {sample['kernels_rss_mb']:.1f} PSS {sample['kernels_pss_mb']:.1f} MB"
            + ("  KERNELS CHANGED" if sample["kernels_changed"] else ""))
        if len(samples) == 1:
            left = (args.requests - totals["requests"]) / max(1.0, sample["slice_rps"])
            log(f"at this rate the rest takes about {minutes(left)}")
    n = max(1, totals["requests"])
    totals["rps"] = round(totals["requests"] / totals["seconds"], 1) if totals["seconds"] else 0
    totals["errors"] = totals["non2xx"] + totals["socket_errors"]
    totals["server_cpu_ms_per_req"] = round(totals["server_cpu_ms"] / n, 4)
    totals["kernel_cpu_ms_per_req"] = round(totals["kernel_cpu_ms"] / n, 4)
    return {"samples": samples, "totals": totals, "aborted": aborted}


def markdown(res: dict) -> str:
    t, g = res["totals"], res["growth"]
    lines = [
        f"# Soak: {t['requests']} requests ({res['started']})", "",
        (f"`{res['command']}` on {res['cores']} cores, load average "
         f"{res['loadavg_start'][0]:.2f} at the start, {res['loadavg_end'][0]:.2f} at the end; "
         f"{res['seconds']} s. kgpool `{res['versions'].get('kgpool', '?')}` from "
         f"{res['versions'].get('kgpool_source', '?')}."), "",
        (f"`{res['server']}` on `{res['notebook']}`, {res['kernels']} kernels, wrk "
         f"c={res['concurrency']} ({res['args']['threads']} thread) in slices; every body "
         f"checked against `{EXPECTED!r}`."), "",
        (f"**{t['requests']} requests, {t['rps']:.0f} req/s, errors {t['errors']} (non-2xx "
         f"{t['non2xx']}, socket {t['socket_errors']}), wrong bodies {t['wrong_bodies']}**; "
         f"distinct-angle check at the end: {res['varied_probe']['bad']} wrong of "
         f"{res['varied_probe']['requests']}; kernels replaced during the run: "
         f"{res['kernel_changes']}; server CPU {t['server_cpu_ms_per_req']:.3f} ms/req, kernels "
         f"{t['kernel_cpu_ms_per_req']:.3f} ms/req."
         + (f" **Aborted: {res['aborted']}.**" if res["aborted"] else "")), "",
        "## Growth per 10,000 requests", "",
        (f"Fit = least-squares slope over the samples past {res['args']['warmup']} requests "
         "(warm-up); first → last = from the first sample to the last. Server = the kgpool "
         "process (and any non-kernel descendants); kernels = summed over the kernels. PSS "
         "also moves when other processes sharing the same pages (libraries) start or exit: "
         "RSS is the figure for a leak."), "",
        "| memory | first sample MB | last sample MB | fit per 10k | first → last per 10k |",
        "|---|---|---|---|---|"]
    for key, name in (("server_rss_mb", "server RSS"), ("server_pss_mb", "server PSS"),
                      ("kernels_rss_mb", "kernels RSS"), ("kernels_pss_mb", "kernels PSS")):
        x = g.get(key)
        if x:
            lines.append(f"| {name} | {x['first']:.2f} | {x['last']:.2f} | "
                         f"{_mb(x['slope_per_10k'])} | {_mb(x['first_last_per_10k'])} |")
    lines += ["", "## Samples (after each slice, the server idle)", "",
              ("| requests | slice req/s | p50 ms | p99 ms | errors | wrong | server RSS MB | "
               "server PSS MB | kernels RSS MB | kernels PSS MB | kernel pids |"),
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in res["samples"]:
        lines.append(
            f"| {s['requests']} | {s['slice_rps']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
            f"{s['errors']} | {s['wrong_bodies']} | {s['server_rss_mb']:.2f} | "
            f"{s['server_pss_mb']:.2f} | {s['kernels_rss_mb']:.2f} | {s['kernels_pss_mb']:.2f} | "
            f"{'changed ' if s['kernels_changed'] else ''}{len(s['kernel_pids'])} |")
    lines += ["", f"Processes left behind: {res['leftover_processes'] or 'none'}.", ""]
    return "\n".join(lines)


def _mb(x: float | None) -> str:
    return "—" if x is None else f"{x:+.3f} MB"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bash benchmarks/run.sh soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--kernels", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=64, help="wrk connections")
    p.add_argument("--channel", choices=("direct", "jupyter", "default"), default="direct",
                   help="kgpool --channel (default: direct; `default` passes none)")
    p.add_argument("--sample-every", type=int, default=10_000, help="requests per sample")
    p.add_argument("--warmup", type=int, default=20_000,
                   help="requests before the samples the growth is fitted over")
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--max-minutes", type=float, default=15.0, help="abort after this long")
    p.add_argument("--name", default=None,
                   help="write results/NAME.{md,json}: `--name soak` updates the committed "
                   "results/soak.*, which the main report summarises (default: "
                   "results/local/soak-<time>.*, not in git)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    deadline = began + args.max_minutes * 60
    LOGS.mkdir(parents=True, exist_ok=True)
    nb, _ = notebook_path()
    kind = "kgpool" if args.channel == "default" else f"kgpool-{args.channel}"
    log(f"soak: {args.requests} requests to {kind}, {args.kernels} kernels, c={args.concurrency}; "
        f"about {minutes(args.requests / GUESS_RPS + 5)} at {GUESS_RPS:.0f} req/s "
        f"(at most {args.max_minutes:g} min)")
    res: dict = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["bash", "benchmarks/run.sh", "soak", *argv]),
        "args": vars(args), "cores": os.cpu_count(), "loadavg_start": os.getloadavg(),
        "versions": versions(), "server": kind, "notebook": str(nb.relative_to(REPO)),
        "kernels": args.kernels, "concurrency": args.concurrency,
    }
    server = Server(kind, nb, args.kernels, "soak")
    try:
        server.wait_ready()
        log(f"{kind} ready in {server.ready_s:.2f}s on port {server.port}")
        res.update(soak(args, server, deadline))
        res["varied_probe"] = (probe_varied(server.port) if server.proc.running() else
                               {"requests": 0, "bad": 0, "samples": []})
    finally:
        server.stop()
    res["kernel_changes"] = sum(s["kernels_changed"] for s in res["samples"])
    res["growth"] = growth(res["samples"], args.warmup)
    res["stop"] = server.proc.stop_info
    res["loadavg_end"] = os.getloadavg()
    res["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    res["seconds"] = round(time.monotonic() - began, 1)
    res["leftover_processes"] = procs.leftovers()
    base = output_base(args.name, "soak")
    base.parent.mkdir(parents=True, exist_ok=True)
    base.parent.joinpath(base.name + ".json").write_text(json.dumps(res, indent=1) + "\n")
    base.parent.joinpath(base.name + ".md").write_text(markdown(res))
    log(f"wrote {base.relative_to(REPO)}.md and .json; took {minutes(res['seconds'])}")
    for key, x in res["growth"].items():
        log(f"growth {key}: fit {_mb(x['slope_per_10k'])} / 10k requests, first → last "
            f"{_mb(x['first_last_per_10k'])} / 10k ({x['first']:.1f} → {x['last']:.1f} MB)")
    t = res["totals"]
    bad = t["errors"] or t["wrong_bodies"] or res["varied_probe"]["bad"]
    return 1 if res["leftover_processes"] or res["aborted"] or bad else 0


if __name__ == "__main__":
    procs.run_main(main, log)
