"""Turns one benchmark result (the dict bench.py writes as latest.json) into markdown and a PNG."""

from __future__ import annotations

import statistics
from pathlib import Path

LABEL = {"kgpool": "kgpool", "kg": "Kernel Gateway"}
COLOR = {"kgpool": "tab:blue", "kg": "tab:orange"}


def _f(x, nd: int = 1) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _cell(res: dict, k: int, c: int, kind: str) -> dict | None:
    for r in res["sweep"]:
        if r["kernels"] == k and r["concurrency"] == c and r["server"] == kind:
            return r
    return None


def _floor(res: dict, mode: str, c: int) -> dict | None:
    if not res.get("floor"):
        return None
    for r in res["floor"]["results"]:
        if r["mode"] == mode and r["concurrency"] == c:
            return r
    return None


def _startup(res: dict, kind: str, k: int, key: str = "first_body_s") -> float | None:
    vals = [r[key] for r in res["startup"] if r["server"] == kind and r["kernels"] == k and r[key] is not None]
    return statistics.median(vals) if vals else None


def _ratio(a, b) -> str:
    return "—" if not a or not b else f"{a / b:.2f}×"


def _pair(a: dict | None, b: dict | None, key: str, nd: int = 1) -> str:
    return f"{_f(a[key] if a else None, nd)} / {_f(b[key] if b else None, nd)}"


def targets(res: dict) -> list[str]:
    out = []
    if "kgpool" not in res["servers"] or "kg" not in res["servers"]:
        return ["(kgpool not measured in this run)"]
    a, b = _cell(res, 2, 16, "kgpool"), _cell(res, 2, 16, "kg")
    if a and b:
        out.append(f"Throughput, 2 kernels, c=16: kgpool {a['rps']:.0f} req/s vs Kernel Gateway {b['rps']:.0f} "
                   f"→ **{a['rps'] / b['rps']:.2f}×** (target ≥ 2.0×)")
        fl = _floor(res, "one", 16)
        if fl and res["floor"]["results"][0]["kernels"] == 2:
            out.append(f"vs raw jupyter_client one-execute floor (2 kernels, c=16, {fl['rps']:.0f} req/s): "
                       f"**{a['rps'] / fl['rps']:.2f}×** (target ≥ 0.9×)")
        out.append(f"Server CPU per request, 2 kernels, c=16: kgpool **{a['server_cpu_ms_per_req']:.2f} ms** vs "
                   f"Kernel Gateway {b['server_cpu_ms_per_req']:.2f} ms (target ≤ 1.5 ms)")
    for k in res["args"]["kernels"]:
        a, b = _cell(res, k, 1, "kgpool"), _cell(res, k, 1, "kg")
        if a and b:
            out.append(f"p50 at c=1, {k} kernel(s): kgpool {a['p50_ms']:.2f} ms vs Kernel Gateway {b['p50_ms']:.2f} ms "
                       f"→ **{a['p50_ms'] / b['p50_ms']:.2f}×** (target ≤ 0.6×)")
    for k in res["args"]["kernels"]:
        a, b = _cell(res, k, 64, "kgpool"), _cell(res, k, 64, "kg")
        if a and b:
            out.append(f"Throughput at c=64, {k} kernel(s): **{a['rps'] / b['rps']:.2f}×** Kernel Gateway "
                       f"(past-the-floor target ≥ 10×)")
    errs = {kind: sum(r["errors"] for r in res["sweep"] if r["server"] == kind) for kind in res["servers"]}
    wrong = {kind: sum(r["wrong_bodies"] for r in res["sweep"] if r["server"] == kind) for kind in res["servers"]}
    out.append(f"Errors in the sweep: kgpool {errs['kgpool']}, Kernel Gateway {errs['kg']}; wrong bodies: "
               f"kgpool {wrong['kgpool']}, Kernel Gateway {wrong['kg']} (target 0)")
    s1, s4 = _startup(res, "kgpool", 1), _startup(res, "kgpool", 4)
    if s1 and s4:
        out.append(f"Start-up, first correct answer: kgpool 4 kernels {s4:.2f} s / 1 kernel {s1:.2f} s → "
                   f"**{s4 / s1:.2f}×** (target ≤ 1.5×); Kernel Gateway "
                   f"{_ratio(_startup(res, 'kg', 4), _startup(res, 'kg', 1))}")
    return out


def markdown(res: dict) -> str:
    a = res["args"]
    v = res["versions"]
    lines = [
        "# kgpool vs Jupyter Kernel Gateway — latest benchmark run",
        "",
        f"Command: `bash benchmarks/run.sh{' --quick' if a['quick'] else ''}` "
        f"(kernels {a['kernels']}, concurrency {a['concurrency']}, {a.get('rounds', 1)} × {a['duration']} s per server "
        f"and cell, "
        f"wrk {a['threads']} thread(s)).  ",
        f"Run {res['started']} → {res['finished']} UTC on {res['cores']} cores; load average "
        f"{res['loadavg_start'][0]:.2f} at start, {res['loadavg_end'][0]:.2f} at end.  ",
        f"Notebook `{res['notebook']}`{' (temporary dev copy)' if res['dev_notebook'] else ''}; "
        f"every response checked against `{res['expected_body']!r}`.  ",
        f"kgpool: `{v.get('kgpool', 'not installed')}` ({v.get('bench_venv', '')}), git {v.get('git') or '—'}.  ",
        f"Peer: {v.get('kg_venv', '')}.  {v.get('wrk', '')}.",
        "",
        "Absolute numbers are machine- and noise-dependent (the machine may be shared); the ratios come from "
        "the two servers alternating inside every cell of one run.",
        "",
        "## Against the targets of issue 5",
        "",
        *[f"- {t}" for t in targets(res)],
        "",
        "## Sweep",
        "",
        "Pairs are `kgpool / Kernel Gateway`. Errors = non-2xx + socket errors; wrong = 2xx with another body. "
        "CPU is utime+stime from /proc per request (server = the server process and its non-kernel "
        "descendants; kernels = all ipykernel descendants). RSS after the run, kernels summed. "
        "Others = CPU used by processes outside this benchmark during the run, % of the whole machine "
        "(a noise gauge; median over rounds).",
        "",
        "| K | c | req/s | ratio | p50 ms | p99 ms | errors | wrong | server CPU ms/req | kernel CPU ms/req "
        "| server RSS MB | kernels RSS MB | others CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in a["kernels"]:
        for c in a["concurrency"]:
            x, y = _cell(res, k, c, "kgpool"), _cell(res, k, c, "kg")
            if not x and not y:
                continue
            lines.append(
                f"| {k} | {c} | {_pair(x, y, 'rps', 0)} | {_ratio(x and x['rps'], y and y['rps'])} "
                f"| {_pair(x, y, 'p50_ms', 2)} | {_pair(x, y, 'p99_ms', 2)} | {_pair(x, y, 'errors', 0)} "
                f"| {_pair(x, y, 'wrong_bodies', 0)} | {_pair(x, y, 'server_cpu_ms_per_req', 2)} "
                f"| {_pair(x, y, 'kernel_cpu_ms_per_req', 2)} | {_pair(x, y, 'server_rss_mb', 0)} "
                f"| {_pair(x, y, 'kernel_rss_mb', 0)} | {_pair(x, y, 'others_cpu_pct', 0)} |")
    bad = [r for r in res["sweep"] if r.get("sample_bad")]
    if bad:
        lines += ["", "First bad response seen per cell:", ""]
        lines += [f"- {r['server']} K={r['kernels']} c={r['concurrency']}: status {r['sample_bad'][0]}, "
                  f"body `{r['sample_bad'][1][:200]!r}`" for r in bad]
    lines += ["", "## Start-up (seconds from process start)", "",
              "kgpool: `/readyz` 200, first correct `/convert` body, and `kgpool_kernels{state=\"idle\"}` ≥ K in "
              "/metrics. Kernel Gateway has no readiness endpoint; it answers only after every prespawned kernel "
              "ran the notebook, so its three columns are the same moment. Median over reps.", "",
              "| server | K | readyz | first correct body | all K warm | reps |", "|---|---|---|---|---|---|"]
    for kind in res["servers"]:
        for k in a["startup_kernels"]:
            reps = [r for r in res["startup"] if r["server"] == kind and r["kernels"] == k]
            if reps:
                lines.append(f"| {LABEL[kind]} | {k} | {_f(_startup(res, kind, k, 'ready_s'), 2)} "
                             f"| {_f(_startup(res, kind, k, 'first_body_s'), 2)} "
                             f"| {_f(_startup(res, kind, k, 'all_warm_s'), 2)} "
                             f"| {', '.join(_f(r['first_body_s'], 2) for r in reps)} |")
    lines += ["", "## Raw jupyter_client floor (no HTTP; `benchmarks/floor.py`)", ""]
    if res.get("floor"):
        fk = res["floor"]["results"][0]["kernels"]
        lines += [f"{fk} kernels, async jupyter_client, each execute waits for its execute_reply and iopub idle. "
                  "`two` = `REQUEST=` then the cell (what Kernel Gateway sends); `one` = both in one execute; "
                  "`pass` = an empty execute.", "",
                  "| mode | c | req/s | p50 ms | p99 ms | errors | wrong |", "|---|---|---|---|---|---|---|"]
        for r in res["floor"]["results"]:
            lines.append(f"| {r['mode']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['errors']} | {r['wrong_bodies']} |")
    else:
        lines.append("(not run)")
    ke = res.get("kernel_executables") or {}
    lines += ["", "## Notes", "",
              f"- Kernel executables: " + "; ".join(f"{LABEL[k]} `{', '.join(v)}`" for k, v in ke.items()),
              "- Both servers use their default logging, sent to a file. wrk is closed-loop (no coordinated-"
              "omission correction); p50/p99 come from wrk's latency histogram.",
              f"- Processes left behind: {res['leftover_processes'] or 'none'}.",
              "- Raw data: `benchmarks/results/latest.json`; plot: `benchmarks/results/latest.png`.", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ks = res["args"]["kernels"]
    cs = res["args"]["concurrency"]
    fig, axes = plt.subplots(2, len(ks), figsize=(4.2 * len(ks), 7), squeeze=False, sharex=True)
    for j, k in enumerate(ks):
        top, bot = axes[0][j], axes[1][j]
        for kind in res["servers"]:
            rows = [r for c in cs if (r := _cell(res, k, c, kind))]
            x = [r["concurrency"] for r in rows]
            top.plot(x, [r["rps"] for r in rows], "o-", color=COLOR[kind], label=LABEL[kind])
            bot.plot(x, [r["p50_ms"] for r in rows], "o-", color=COLOR[kind], label=f"{LABEL[kind]} p50")
            bot.plot(x, [r["p99_ms"] for r in rows], "s--", color=COLOR[kind], alpha=0.7, label=f"{LABEL[kind]} p99")
        if res.get("floor") and res["floor"]["results"][0]["kernels"] == k:
            for mode, style in (("one", ":"), ("two", "-.")):
                fl = _floor(res, mode, 16)
                if fl:
                    top.axhline(fl["rps"], color="gray", ls=style, lw=1,
                                label=f"jupyter_client floor, {mode} execute(s), c=16")
        top.set_title(f"{k} kernel{'s' if k > 1 else ''}")
        top.set_ylabel("requests / s")
        top.set_ylim(bottom=0)
        bot.set_ylabel("latency ms (p50 solid, p99 dashed)")
        bot.set_yscale("log")
        bot.set_xlabel("concurrent connections (wrk)")
        for ax in (top, bot):
            ax.set_xscale("log", base=2)
            ax.set_xticks(cs)
            ax.set_xticklabels([str(c) for c in cs])
            ax.grid(True, which="both", alpha=0.3)
        bot.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        bot.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        top.legend(fontsize=7, loc="best")
        if j == 0:
            bot.legend(fontsize=7)
    fig.suptitle(f"kgpool vs Kernel Gateway 3.0.1, convert notebook ({res['started'][:16]} UTC, "
                 f"{res['cores']} cores, {res['args'].get('rounds', 1)} × {res['args']['duration']} s per point)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
