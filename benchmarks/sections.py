"""More sections of the main report (report.py): issue 18's targets, against the aiohttp
hello-world ceiling and a baseline kgpool measured in the same rotation, and summaries of the
latest results of the other benchmarks (fork.sh, `run.sh serving`, `run.sh soak`), each with
the command that produced it, its date and a link to its own report."""

from __future__ import annotations

import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
HELLO = "aiohttp-hello"
BASE_OF = {"kgpool-direct": "base-direct", "kgpool-jupyter": "base-jupyter"}
MIB = 2**20
# the other benchmarks whose latest results the main report summarises: kind -> default NAME
INCLUDE = {"fork": "issue15-fork", "serving": "serving", "soak": "soak"}


def _cell(res: dict, k: int, c: int, kind: str) -> dict | None:
    for r in res["sweep"]:
        if r["kernels"] == k and r["concurrency"] == c and r["server"] == kind:
            return r
    return None


def _v(row: dict | None, key: str, nd: int, unit: str = "") -> str:
    return "—" if not row else f"{row[key]:.{nd}f}{unit}"


def _x(a: float | None, b: float | None) -> str:
    return "—" if not a or not b else f"{a / b:.2f}×"


def targets18(res: dict, label: dict[str, str]) -> list[str]:
    """Issue 18: direct channel ≥ 0.4× the hello-world ceiling and ≥ 1.8× the baseline at K=2
    c=64, server CPU ≤ 0.15 ms/req, the Jupyter channel no slower than the baseline; then a
    table of every cell with the ceiling or a baseline in it."""
    servers = res["servers"]
    mine = [s for s in servers if s.startswith("kgpool")]
    if not mine or (HELLO not in servers and not any(s.startswith("base-") for s in servers)):
        return [("(no aiohttp hello-world ceiling and no baseline kgpool in this run: "
                "`--servers kgpool-direct,kgpool-jupyter,aiohttp-hello` and, with "
                "`KGPOOL_BASE=<commit>`, base-direct,base-jupyter)"), ""]
    out: list[str] = []
    # the direct channel; kgpool without --channel (older kgpool: the only channel) otherwise
    d = _cell(res, 2, 64, "kgpool-direct") or _cell(res, 2, 64, "kgpool")
    h = _cell(res, 2, 64, HELLO)
    bd, j, bj = (_cell(res, 2, 64, s) for s in ("base-direct", "kgpool-jupyter", "base-jupyter"))
    if d and h:
        out.append(f"- {label[d['server']]}, 2 kernels, c=64: {d['rps']:.0f} req/s = "
                   f"**{d['rps'] / h['rps']:.2f}×** the aiohttp hello-world ceiling "
                   f"({h['rps']:.0f} req/s, server CPU {h['server_cpu_ms_per_req']:.3f} ms/req) "
                   "(target ≥ 0.4×)")
    if d and bd:
        out.append(f"- {label[d['server']]}, 2 kernels, c=64, against the baseline: "
                   f"{d['rps']:.0f} vs "
                   f"{bd['rps']:.0f} req/s → **{d['rps'] / bd['rps']:.2f}×** (target ≥ 1.8×)")
    if d:
        out.append(f"- Server CPU per request, {label[d['server']]}, 2 kernels, c=64: "
                   f"**{d['server_cpu_ms_per_req']:.3f} ms** (target ≤ 0.15 ms)"
                   + (f"; baseline {bd['server_cpu_ms_per_req']:.3f} ms" if bd else ""))
    if j and bj:
        out.append(f"- {label['kgpool-jupyter']}, 2 kernels, c=64, against the baseline: "
                   f"{j['rps']:.0f} vs "
                   f"{bj['rps']:.0f} req/s → **{j['rps'] / bj['rps']:.2f}×** (target ≥ 1.0×: "
                   "no slower)")
    if not out:
        out.append("- (the target cell, 2 kernels at c=64, was not measured in this run)")
    out += ["", ("Every cell: req/s of each kgpool variant ÷ the hello-world ceiling (aiohttp "
                 "alone, `benchmarks/hello.py`, the same body, access log on) and ÷ its baseline "
                 "(`base-*`, KGPOOL_BASE) in the same rotation; server CPU per request."), "",
            ("| K | c | ceiling req/s | ceiling server CPU ms/req | server | req/s | ÷ ceiling | "
             "÷ baseline | server CPU ms/req |"),
            "|---|---|---|---|---|---|---|---|---|"]
    for k in res["args"]["kernels"]:
        for c in res["args"]["concurrency"]:
            h = _cell(res, k, c, HELLO)
            for kind in [s for s in servers if s.startswith(("kgpool", "base-"))]:
                r = _cell(res, k, c, kind)
                if not r:
                    continue
                b = _cell(res, k, c, BASE_OF.get(kind, ""))
                out.append(
                    f"| {k} | {c} | {_v(h, 'rps', 0)} | "
                    f"{_v(h, 'server_cpu_ms_per_req', 3)} | {label[kind]} | "
                    f"{r['rps']:.0f} | {_x(r['rps'], h and h['rps'])} | "
                    f"{_x(r['rps'], b and b['rps'])} | {r['server_cpu_ms_per_req']:.3f} |")
    return out + [""]


# ----- the other benchmarks' latest results --------------------------------------------------

def included(spec: str) -> list[dict]:
    """The results named by `spec` ("fork=NAME,serving=NAME,soak=NAME"; a kind left out takes
    its default NAME, `kind=` drops it) that exist: kind, repo-relative path, date, command."""
    names = dict(INCLUDE)
    for part in filter(None, spec.split(",")):
        kind, _, name = part.partition("=")
        if kind not in names:
            raise ValueError(f"--include: unknown kind {kind!r} (one of {', '.join(names)})")
        names[kind] = name
    out = []
    for kind, name in names.items():
        path = RESULTS / f"{name}.json"
        if name and path.exists():
            data = json.loads(path.read_text())
            out.append({"kind": kind, "path": str(path.relative_to(REPO)),
                        "started": data.get("started"), "command": data.get("command")})
    return out


def others(res: dict, md_dir: Path | None) -> list[str]:
    """A section per included result, read again from its JSON (the latest of each)."""
    lines: list[str] = []
    for inc in res.get("included", []):
        path = REPO / inc["path"]
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        md = path.with_suffix(".md")
        link = os.path.relpath(md, md_dir.resolve()) if md_dir else str(md.relative_to(REPO))
        head = [(f"Command: `{data.get('command')}`, run {data.get('started')}; full "
                f"report: [{md.name}]({link}), data `{inc['path']}`."), ""]
        lines += {"fork": _fork, "serving": _serving, "soak": _soak}[inc["kind"]](data, head)
    return lines


def _fork(data: dict, head: list[str]) -> list[str]:
    out = ["## Forked kernels: memory and recovery (`benchmarks/fork.sh`)", "", *head]
    mem, rec, burst = data.get("memory") or {}, data.get("recovery") or {}, data.get("burst") or {}
    if mem:
        out += [(f"Total PSS of the kernels after serving, on a notebook whose init allocates "
                f"{data['args']['megabytes']} MB:"), "",
                "| setup | total PSS MiB | × one kernel | ready in s |", "|---|---|---|---|"]
        out += [f"| {name} (--kernels {m['kernels']}) | {m['total_pss'] / MIB:.0f} | "
                f"{m.get('ratio_to_one_kernel', 1.0):.2f} | {m['ready_s']} |"
                for name, m in mem.items()]
        out.append("")
    if rec or burst:
        out += [("| mode | a killed kernel's slot serves again (p50) | statuses under kills | "
                "until 8 kernels serve a burst (p50) |"), "|---|---|---|---|"]
        for mode in sorted(set(rec) | set(burst)):
            r, b = rec.get(mode), burst.get(mode)
            out.append(f"| {mode} | {_v(r, 'serves_again_p50_s', 3, ' s')} | "
                       f"{r['statuses'] if r else '—'} | "
                       f"{_v(b, 'eight_serve_p50_s', 3, ' s')} |")
        out.append("")
    return out


def _serving(data: dict, head: list[str]) -> list[str]:
    out = ["## Batching and streaming (`bash benchmarks/run.sh serving`)", "", *head]
    b = data.get("batching")
    if b:
        out += [(f"Batching, {b['kernels']} kernels, {b['concurrency']} clients: batched ÷ "
                f"unbatched throughput **{b['ratio']}×**, mean batch size "
                f"{b['mean_batch_size']}."), "",
                "| endpoint | req/s | p50 ms | p99 ms | wrong | failed | server CPU ms/req |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| `POST {path}` | {s['rps']} | {s['p50_ms']} | {s['p99_ms']} | {s['wrong']} | "
                f"{s['failed']} | {s['server_cpu_ms_per_req']} |"
                for path, s in b["summary"].items()]
        out.append("")
    s = data.get("streaming")
    if s:
        out += ["Streaming, five words 200 ms apart (ms from sending the request):", "",
                "| server, mode | first chunk (median) | last chunk (median) | words in order |",
                "|---|---|---|---|"]
        out += [f"| {name} | {r['first_chunk_ms_median']} | {r['last_chunk_ms_median']} | "
                f"{'yes' if r['in_order'] else 'NO'} |" for name, r in s.items()]
        out.append("")
    return out


def _soak(data: dict, head: list[str]) -> list[str]:
    t, g = data["totals"], data["growth"]
    out = ["## Soak (`bash benchmarks/run.sh soak`)", "", *head,
           (f"{t['requests']} requests to {data['server']}, {data['kernels']} kernels, "
            f"c={data['concurrency']}: {t['rps']:.0f} req/s, errors {t['errors']}, wrong bodies "
            f"{t['wrong_bodies']}, kernel restarts {data['kernel_changes']}"
            + (f"; **aborted: {data['aborted']}**" if data.get("aborted") else "") + "."), "",
           ("| memory | first sample MB | last sample MB | growth per 10k requests (fit) | "
           "first → last per 10k |"), "|---|---|---|---|---|"]
    for key, name in (("server_rss_mb", "server RSS"), ("server_pss_mb", "server PSS"),
                      ("kernels_rss_mb", "kernels RSS (sum)"),
                      ("kernels_pss_mb", "kernels PSS (sum)")):
        if key in g:
            x = g[key]
            out.append(f"| {name} | {x['first']:.1f} | {x['last']:.1f} | "
                       f"{_mb(x['slope_per_10k'])} | {_mb(x['first_last_per_10k'])} |")
    return out + [""]


def _mb(x: float | None) -> str:
    return "—" if x is None else f"{x:+.2f} MB"
