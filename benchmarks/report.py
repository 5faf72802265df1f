"""Turns one benchmark result (the dict bench.py writes as latest.json) into markdown and a PNG."""

from __future__ import annotations

import statistics
from pathlib import Path

import sections

LABEL = {
    "kgpool": "kgpool",
    "kgpool-direct": "kgpool --channel direct",
    "kgpool-jupyter": "kgpool --channel jupyter",
    "base-direct": "baseline kgpool --channel direct",
    "base-jupyter": "baseline kgpool --channel jupyter",
    "kg": "Kernel Gateway",
    "aiohttp-hello": "aiohttp hello-world (ceiling)",
}
SHORT = {"kgpool": "kgpool", "kgpool-direct": "direct", "kgpool-jupyter": "jupyter",
         "base-direct": "base direct", "base-jupyter": "base jupyter", "kg": "KG",
         "aiohttp-hello": "hello"}
COLOR = {
    "kgpool": "tab:blue",
    "kgpool-direct": "tab:blue",
    "kgpool-jupyter": "tab:green",
    "base-direct": "tab:cyan",
    "base-jupyter": "tab:olive",
    "kg": "tab:orange",
    "aiohttp-hello": "tab:gray",
}


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
    vals = [
        r[key]
        for r in res["startup"]
        if r["server"] == kind and r["kernels"] == k and r[key] is not None
    ]
    return statistics.median(vals) if vals else None


def _ratio(a, b) -> str:
    return "—" if not a or not b else f"{a / b:.2f}×"


def _multi(rows: list[dict | None], key: str, nd: int = 1) -> str:
    return " / ".join(_f(r[key] if r else None, nd) for r in rows)


def _kgpools(res: dict) -> list[str]:
    return [s for s in res["servers"] if s not in ("kg", sections.HELLO)]


def _exe(path: str) -> str:
    """A kernel executable as the report shows it: from benchmarks/ on (older results hold
    absolute paths)."""
    return path[path.index("benchmarks/"):] if path.startswith("/") and "benchmarks/" in path \
        else path


def targets(res: dict) -> list[str]:
    mine = _kgpools(res)
    if not mine or "kg" not in res["servers"]:
        return ["(kgpool and Kernel Gateway were not both measured in this run)"]
    proto = "kgpool-jupyter" if "kgpool-jupyter" in mine else mine[0]
    fast = "kgpool-direct" if "kgpool-direct" in mine else mine[0]
    out = []
    a, b = _cell(res, 2, 16, proto), _cell(res, 2, 16, "kg")
    if a and b:
        out.append(
            f"Throughput, Jupyter protocol path ({LABEL[proto]}), 2 kernels, c=16: "
            f"{a['rps']:.0f} req/s vs "
            f"Kernel Gateway {b['rps']:.0f} → **{a['rps'] / b['rps']:.2f}×** (target ≥ 2.0×)"
        )
        fi = next(
            (
                f
                for f in res.get("floor_inline", [])
                if f["kernels"] == 2 and f["concurrency"] == 16
            ),
            None,
        )
        if fi:
            out.append(
                "… vs the raw jupyter_client one-execute floor, 2 kernels, c=16, measured "
                "in the same "
                f"rotation ({fi['rps']:.0f} req/s): **{a['rps'] / fi['rps']:.2f}×** (target ≥ 0.9×)"
            )
        fl = _floor(res, "one", 16)
        if fl and res["floor"]["results"][0]["kernels"] == 2:
            out.append(
                f"… vs the same floor from the separate floor phase ({fl['rps']:.0f} req/s): "
                f"{a['rps'] / fl['rps']:.2f}×"
            )
    for kind in mine:
        a = _cell(res, 2, 16, kind)
        if a and b:
            out.append(
                f"Server CPU per request, 2 kernels, c=16: {LABEL[kind]} "
                f"**{a['server_cpu_ms_per_req']:.2f} ms**"
                f" vs Kernel Gateway {b['server_cpu_ms_per_req']:.2f} ms (target ≤ 1.5 ms)"
            )
    for k in res["args"]["kernels"]:
        b = _cell(res, k, 1, "kg")
        parts = [
            f"{LABEL[kind]} {a['p50_ms']:.2f} ms (**{a['p50_ms'] / b['p50_ms']:.2f}×**)"
            for kind in mine
            if (a := _cell(res, k, 1, kind)) and b
        ]
        if parts and b:
            out.append(
                f"p50 at c=1, {k} kernel(s), vs Kernel Gateway {b['p50_ms']:.2f} ms: "
                + "; ".join(parts)
                + " (target ≤ 0.6×)"
            )
    for k in res["args"]["kernels"]:
        a, b = _cell(res, k, 64, fast), _cell(res, k, 64, "kg")
        if a and b:
            out.append(
                f"Throughput at c=64, {k} kernel(s), {LABEL[fast]}: {a['rps']:.0f} req/s = "
                f"**{a['rps'] / b['rps']:.2f}×** Kernel Gateway (past-the-floor target ≥ 10×)"
            )
    errs = ", ".join(
        f"{LABEL[k]} {sum(r['errors'] for r in res['sweep'] if r['server'] == k)}"
        for k in res["servers"]
    )
    wrong = ", ".join(
        f"{LABEL[k]} {sum(r['wrong_bodies'] for r in res['sweep'] if r['server'] == k)}"
        for k in res["servers"]
    )
    vp = ", ".join(
        f"{LABEL[k]} {sum(p['bad'] for p in res.get('varied_probe', []) if p['server'] == k)}"
        for k in res["servers"]
        if k != sections.HELLO  # one constant answer: not probed
    )
    out.append(
        f"Errors in the sweep: {errs}. Wrong bodies: {wrong}; wrong in the distinct-angle "
        f"check: {vp} "
        "(target 0 everywhere)"
    )
    for kind in mine:
        s1, s4 = _startup(res, kind, 1), _startup(res, kind, 4)
        if s1 and s4:
            out.append(
                f"Start-up to first correct answer, {LABEL[kind]}: 4 kernels {s4:.2f} s / 1 "
                f"kernel {s1:.2f} s "
                f"→ **{s4 / s1:.2f}×** (target ≤ 1.5×); Kernel Gateway "
                f"{_ratio(_startup(res, 'kg', 4), _startup(res, 'kg', 1))}"
            )
    return out


def _stops(res: dict) -> list[str]:
    """One line per server kind: how it went away on SIGTERM."""
    out = []
    for kind in res["servers"]:
        st = [x for x in res.get("stops", []) if x["server"] == kind]
        if not st:
            continue
        crashed = [x for x in st if not x["was_running"]]
        out.append(
            f"- {LABEL[kind]} on SIGTERM ({len(st)} stops): exit codes "
            f"{sorted({x['exit'] for x in st})}, "
            f"slowest {max(x['stop_s'] for x in st):.2f} s, needed SIGKILL "
            f"{sum(x['sigkill'] for x in st)}×, "
            f"left descendants for the harness to kill {sum(x['descendants_left'] for x in st)}"
            + (f", had already exited {len(crashed)}×" if crashed else "")
            + "."
        )
    return out


def markdown(res: dict, out: Path | None = None) -> str:
    """The report; `out` is where it will be written (for links to the other reports)."""
    a = res["args"]
    v = res["versions"]
    servers = res["servers"]
    mine = _kgpools(res)
    order = " / ".join(SHORT[s] for s in servers)
    lines = [
        "# kgpool vs Jupyter Kernel Gateway — latest benchmark run",
        "",
        (
            f"Command: `{res.get('command', 'bash benchmarks/run.sh')}` "
            f"(kernels {a['kernels']}, concurrency {a['concurrency']}, {a.get('rounds', 1)} "
            f"× {a['duration']} s per "
            f"server and cell, wrk {a['threads']} thread(s)).  "
        ),
        (
            f"Run {res['started']} → {res['finished']} UTC on {res['cores']} cores; load average "
            f"{res['loadavg_start'][0]:.2f} at start, {res['loadavg_end'][0]:.2f} at end.  "
        ),
        (
            f"Notebook `{res['notebook']}`"
            f"{' (temporary dev copy)' if res['dev_notebook'] else ''}; "
            f"every response checked against `{res['expected_body']!r}`.  "
        ),
        f"Servers: {', '.join(LABEL[s] for s in servers)}.  ",
        (
            f"kgpool: `{v.get('kgpool', 'not installed')}` from {v.get('kgpool_source', '—')} "
            f"({v.get('bench_venv', '')}).  "
            + (f"Baseline: kgpool from {v['baseline_source']}.  " if "baseline_source" in v
               else "")
        ),
        f"Peer: {v.get('kg_venv', '')}.  {v.get('wrk', '')}.",
        "",
        (
            "Absolute numbers are machine- and noise-dependent (the machine may be shared: "
            "see the *others* column); "
            "the ratios come from the servers taking turns inside every cell of one run."
        ),
        "",
        "## Against the targets of issue 18",
        "",
        *sections.targets18(res, LABEL),
        "## Against the targets of issue 5",
        "",
        *[f"- {t}" for t in targets(res)],
        "",
        "## Sweep",
        "",
        (
            f"Each cell lists `{order}`; ratio = req/s of each kgpool variant ÷ Kernel Gateway. "
            "Errors = non-2xx + socket errors; wrong = 2xx with another body. "
            "CPU is utime+stime from /proc per request (server = the server process and its "
            "non-kernel "
            "descendants; kernels = all ipykernel descendants). RSS after the run, kernels summed. "
            "Others = CPU used by processes outside this benchmark during the run, % of the "
            "whole machine "
            "(a noise gauge; median over rounds)."
        ),
        "",
        (
            "| K | c | req/s | ratio vs KG | p50 ms | p99 ms | errors | wrong | server CPU "
            "ms/req | kernel CPU ms/req "
            "| server RSS MB | kernels RSS MB | others CPU % |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in a["kernels"]:
        for c in a["concurrency"]:
            rows = [_cell(res, k, c, s) for s in servers]
            if not any(rows):
                continue
            kg = _cell(res, k, c, "kg")
            ratios = " / ".join(
                _ratio(x and x["rps"], kg and kg["rps"])
                for x in (_cell(res, k, c, s) for s in mine)
            )
            lines.append(
                f"| {k} | {c} | {_multi(rows, 'rps', 0)} | {ratios} "
                f"| {_multi(rows, 'p50_ms', 2)} | {_multi(rows, 'p99_ms', 2)} | "
                f"{_multi(rows, 'errors', 0)} "
                f"| {_multi(rows, 'wrong_bodies', 0)} | {_multi(rows, 'server_cpu_ms_per_req', 2)} "
                f"| {_multi(rows, 'kernel_cpu_ms_per_req', 2)} | "
                f"{_multi(rows, 'server_rss_mb', 0)} "
                f"| {_multi(rows, 'kernel_rss_mb', 0)} | {_multi(rows, 'others_cpu_pct', 0)} |"
            )
    vp = res.get("varied_probe", [])
    if vp:
        lines += [
            "",
            "Distinct-angle check (before each K's sweep, 200 requests with random angles from 8 "
            "concurrent clients, each body compared with Python's own answer; catches cached or "
            "crossed responses that wrk's constant URL cannot): "
            + "; ".join(f"{LABEL[p['server']]} K={p['kernels']} {p['bad']} wrong" for p in vp)
            + ".",
        ]
        for p in vp:
            for smp in p["samples"]:
                lines.append(
                    f"- {LABEL[p['server']]} K={p['kernels']}: angle {smp['angle']}: status "
                    f"{smp['status']}, "
                    f"body `{smp['body']!r}`, expected `{smp['expected']!r}`"
                )
    bad = [r for r in res["sweep"] if r.get("sample_bad")]
    if bad:
        lines += ["", "First bad response seen per cell:", ""]
        lines += [
            f"- {LABEL[r['server']]} K={r['kernels']} c={r['concurrency']}: status "
            f"{r['sample_bad'][0]}, "
            f"body `{r['sample_bad'][1][:200]!r}`"
            for r in bad
        ]
    lines += [
        "",
        "## Start-up (seconds from process start)",
        "",
        (
            "kgpool: `/readyz` 200, first correct `/convert` body, and "
            '`kgpool_kernels{state="idle"}` ≥ K in '
            "/metrics. Kernel Gateway has no readiness endpoint; it answers only after "
            "every prespawned kernel "
            "ran the notebook, so its three columns are the same moment. Median over reps."
        ),
        "",
        "| server | K | readyz | first correct body | all K warm | reps (first body) |",
        "|---|---|---|---|---|---|",
    ]
    for kind in servers:
        for k in a["startup_kernels"]:
            reps = [r for r in res["startup"] if r["server"] == kind and r["kernels"] == k]
            if reps:
                lines.append(
                    f"| {LABEL[kind]} | {k} | {_f(_startup(res, kind, k, 'ready_s'), 2)} "
                    f"| {_f(_startup(res, kind, k, 'first_body_s'), 2)} "
                    f"| {_f(_startup(res, kind, k, 'all_warm_s'), 2)} "
                    f"| {', '.join(_f(r['first_body_s'], 2) for r in reps)} |"
                )
    lines += [
        "",
        "## Raw jupyter_client floor (no HTTP; `benchmarks/floor.py`)",
        "",
        (
            "Async jupyter_client on its own kernels; each execute waits for its execute_reply "
            "and iopub idle."
        ),
        "",
    ]
    if res.get("floor_inline"):
        lines += [
            (
                "Measured inside the sweep, taking its turn with the servers (one execute per "
                "request):"
            ),
            "",
            "| K | c | floor req/s | floor p50 ms | "
            + " | ".join(f"{LABEL[s]} ÷ floor" for s in mine)
            + " |",
            "|---|---|---|---|" + "---|" * len(mine),
        ]
        for fr in res["floor_inline"]:
            ratios = " | ".join(
                _ratio(x and x["rps"], fr["rps"])
                for x in (_cell(res, fr["kernels"], fr["concurrency"], s) for s in mine)
            )
            lines.append(
                f"| {fr['kernels']} | {fr['concurrency']} | {fr['rps']:.0f} | "
                f"{fr['p50_ms']:.2f} | {ratios} |"
            )
        lines += ["", "Separate floor phase, all three modes:", ""]
    if res.get("floor"):
        fk = res["floor"]["results"][0]["kernels"]
        lines += [
            (
                f"{fk} kernels. `two` = `REQUEST=` then the cell (what Kernel Gateway "
                "sends); `one` = both in one "
                "execute; `pass` = an empty execute."
            ),
            "",
            "| mode | c | req/s | p50 ms | p99 ms | errors | wrong |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["floor"]["results"]:
            lines.append(
                f"| {r['mode']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
                f"{r['p99_ms']:.2f} | {r['errors']} | {r['wrong_bodies']} |"
            )
    else:
        lines.append("(separate floor phase not run)")
    ke = res.get("kernel_executables") or {}
    lines += [
        "",
        "## Notes",
        "",
        "- Kernel executables: "
        + "; ".join(f"{LABEL[k]} `{', '.join(map(_exe, v))}`" for k, v in ke.items()),
        (
            "- All servers use their default logging, sent to a file. wrk is closed-loop "
            "(no coordinated-"
            "omission correction); p50/p99 come from wrk's latency histogram."
        ),
        *_stops(res),
        f"- Processes left behind: {res['leftover_processes'] or 'none'}.",
        f"- Raw data: `{_where(out, '.json')}`; plot: `{_where(out, '.png')}`.",
        "",
        *sections.others(res, out.parent if out else None),
    ]
    return "\n".join(lines)


def _where(out: Path | None, suffix: str) -> str:
    if out is None:
        return f"benchmarks/results/latest{suffix}"
    return str(out.resolve().with_suffix(suffix).relative_to(sections.REPO))


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ks = res["args"]["kernels"]
    cs = res["args"]["concurrency"]
    fig, axes = plt.subplots(2, len(ks), figsize=(4.4 * len(ks), 7.5), squeeze=False, sharex=True)
    for j, k in enumerate(ks):
        top, bot = axes[0][j], axes[1][j]
        for kind in res["servers"]:
            rows = [r for c in cs if (r := _cell(res, k, c, kind))]
            x = [r["concurrency"] for r in rows]
            top.plot(x, [r["rps"] for r in rows], "o-", color=COLOR[kind], label=LABEL[kind])
            bot.plot(
                x, [r["p50_ms"] for r in rows], "o-", color=COLOR[kind], label=f"{LABEL[kind]} p50"
            )
            bot.plot(
                x,
                [r["p99_ms"] for r in rows],
                "s--",
                color=COLOR[kind],
                alpha=0.6,
                label=f"{LABEL[kind]} p99",
            )
        for fr in res.get("floor_inline", []):
            if fr["kernels"] == k:
                first = fr is next(f for f in res["floor_inline"] if f["kernels"] == k)
                top.plot(
                    [fr["concurrency"]],
                    [fr["rps"]],
                    "kx",
                    ms=9,
                    label="jupyter_client floor (one execute)" if first else None,
                )
        top.set_title(f"{k} kernel{'s' if k > 1 else ''}")
        top.set_ylabel("requests / s")
        top.set_yscale("log")
        bot.set_ylabel("latency ms (p50 solid, p99 dashed)")
        bot.set_yscale("log")
        bot.set_xlabel("concurrent connections (wrk)")
        for ax in (top, bot):
            ax.set_xscale("log", base=2)
            ax.set_xticks(cs)
            ax.set_xticklabels([str(c) for c in cs])
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
        top.legend(fontsize=6, loc="best")
        if j == 0:
            bot.legend(fontsize=6, loc="best")
    fig.suptitle(
        f"kgpool vs Kernel Gateway 3.0.1, convert notebook\n({res['started'][:16]} UTC, "
        f"{res['cores']} cores, {res['args'].get('rounds', 1)} × {res['args']['duration']} "
        "s per point)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
