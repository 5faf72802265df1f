"""Model-serving benchmarks: dynamic batching and streamed answers (issue 16).

    bash benchmarks/run.sh serving                  # both phases (~2 min)
    bash benchmarks/run.sh serving --skip streaming --rounds 5 --duration 8

batching: deploy/notebooks/batched_model.ipynb on K kernels (default 2). Its model is a random
forest (scikit-learn) whose predict_proba costs mostly its walk over 100 trees, about the same
for one row as for 32: the "fixed per-call overhead" a batcher exists for. c clients (default
64) post distinct inputs, taking turns (A B, then B A) against `POST /predict` (batched:
max_size=32, max_wait=5ms) and `POST /predict-one` (the same model, one request per call).
Every answer is checked against the model's answer for that client's own input, computed here
beforehand by the notebook's own init cell, so a batch that mixed answers up would count as
wrong, not as fast. The load generator is an aiohttp client in this process, on the same
machine: its CPU is part of the picture.

streaming: deploy/notebooks/streaming.ipynb, `GET /generate-text?words=5&pause=0.2` (chunked)
and `GET /generate?words=5&pause=0.2` (SSE): five words printed 200 ms apart. For each request:
the time of the first chunk and of each later one, and whether the words came in order. Kernel
Gateway (benchmarks/.venv-kg, when present) serves the same notebook for comparison: it sends
the answer when the cell ends.

Writes results/local/serving-<time>.{md,json} (not in git); --name serving updates the
committed results/serving.*. Says at the start how long the run will take (from the options)
and at the end how long it took. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import nbformat
import procs
from bench import LOGS, REPO, VENV_BENCH, VENV_KG, free_port, http_get, log, minutes, output_base

MODEL = REPO / "deploy" / "notebooks" / "batched_model.ipynb"
STREAMING = REPO / "deploy" / "notebooks" / "streaming.ipynb"
INPUTS = 4096  # distinct inputs; request n sends input n % INPUTS


class Served:
    """kgpool (or Kernel Gateway) on one notebook, started in its own session."""

    def __init__(self, kind: str, notebook: Path, kernels: int, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.kind, self.port = kind, free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        if kind == "kgpool":
            cmd = [str(VENV_BENCH / "bin" / "kgpool"), "serve", str(notebook), "--kernels",
                   str(kernels), "--host", "127.0.0.1", "--port", str(self.port), *extra]
        else:
            cmd = [str(VENV_KG / "bin" / "jupyter-kernelgateway"),
                   "--KernelGatewayApp.api=kernel_gateway.notebook_http",
                   f"--KernelGatewayApp.seed_uri={notebook}", "--KernelGatewayApp.ip=127.0.0.1",
                   f"--KernelGatewayApp.port={self.port}",
                   f"--KernelGatewayApp.prespawn_count={kernels}"]
        self.proc = procs.Managed(f"{kind}-{notebook.stem}", cmd,
                                  str(LOGS / f"serving-{kind}-{notebook.stem}.log"), env)

    def wait(self, probe: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.running():
                raise RuntimeError(f"{self.kind} exited; see {self.proc.log_path}")
            if http_get(self.port, probe)[0] == 200:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.kind} not ready in {timeout}s")

    def stop(self) -> None:
        self.proc.stop()


# ----- batching --------------------------------------------------------------------------

def model_answers() -> list[dict[str, Any]]:
    """What the notebook's model answers for each input: its init cell, run here."""
    nb = nbformat.read(MODEL, as_version=4)
    init = next(c.source for c in nb.cells if c.cell_type == "code"
                and not c.source.startswith("#"))
    ns: dict[str, Any] = {}
    exec(compile(init, str(MODEL), "exec"), ns)
    return list(ns["predict"]([features(i) for i in range(INPUTS)]))


def features(i: int) -> list[float]:
    rng = random.Random(i)
    return [round(rng.uniform(-1, 1), 4) for _ in range(16)]


def matches(got: Any, want: dict[str, Any]) -> bool:
    return got == want  # the same forest, the same rounding: the same JSON


async def load(port: int, path: str, conc: int, duration: float,
               expected: list[dict[str, Any]]) -> dict[str, Any]:
    """c closed-loop clients for `duration` seconds; every answer checked."""
    url = f"http://127.0.0.1:{port}{path}"
    bodies = [json.dumps({"features": features(i)}).encode() for i in range(INPUTS)]
    latencies: list[float] = []
    wrong = failed = 0
    counter = 0
    stop_at = time.monotonic() + duration
    connector = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client() -> None:
            nonlocal wrong, failed, counter
            while time.monotonic() < stop_at:
                n = counter % INPUTS
                counter += 1
                started = time.monotonic()
                try:
                    async with session.post(url, data=bodies[n], headers={
                            "Content-Type": "application/json"}) as resp:
                        body = await resp.read()
                        status = resp.status
                except aiohttp.ClientError:
                    failed += 1
                    continue
                latencies.append(time.monotonic() - started)
                if status != 200:
                    failed += 1
                elif not matches(json.loads(body), expected[n]):
                    wrong += 1
        began = time.monotonic()
        await asyncio.gather(*(client() for _ in range(conc)))
        elapsed = time.monotonic() - began
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2) \
            if latencies else 0.0
    return {"requests": len(latencies), "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
            "wrong": wrong, "failed": failed}


def batch_sizes(port: int) -> dict[str, float]:
    text = http_get(port, "/_kgpool/metrics")[1]
    found = {}
    for line in text.splitlines():
        for part in ("sum", "count"):
            if line.startswith(f"kgpool_batch_size_{part}{{") and 'route="/predict"' in line:
                found[part] = float(line.rsplit(" ", 1)[1])
    return found


def phase_batching(args: argparse.Namespace) -> dict[str, Any]:
    log("batching: computing the model's answers for every input")
    expected = model_answers()
    # one BLAS/OpenMP thread per kernel: K kernels share the machine's cores, the way a model
    # is served (threads of several kernels spinning against each other cost both endpoints)
    server = Served("kgpool", MODEL, args.kernels, env={
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    rounds: dict[str, list[dict[str, Any]]] = {"/predict": [], "/predict-one": []}
    try:
        server.wait("/_kgpool/readyz")
        for path in rounds:  # warm-up: BLAS, connections, the batcher
            asyncio.run(load(server.port, path, args.concurrency, 1.0, expected))
        before = batch_sizes(server.port)
        for r in range(args.rounds):
            order = list(rounds) if r % 2 == 0 else list(reversed(rounds))
            for path in order:
                snap0 = server.proc.snapshot()
                res = asyncio.run(load(server.port, path, args.concurrency, args.duration,
                                       expected))
                server_ms, kernel_ms = procs.cpu_ms(snap0, server.proc.snapshot())
                res["server_cpu_ms_per_req"] = round(server_ms / max(1, res["requests"]), 3)
                res["kernel_cpu_ms_per_req"] = round(kernel_ms / max(1, res["requests"]), 3)
                rounds[path].append(res)
                log(f"batching round {r + 1} {path}: {res}")
        after = batch_sizes(server.port)
    finally:
        server.stop()
    batches = after.get("count", 0) - before.get("count", 0)
    mean_batch = (after.get("sum", 0) - before.get("sum", 0)) / batches if batches else 0.0
    summary = {path: summarise(runs) for path, runs in rounds.items()}
    ratio = summary["/predict"]["rps"] / max(summary["/predict-one"]["rps"], 1e-9)
    per_round = [round(b["rps"] / max(u["rps"], 1e-9), 2)
                 for b, u in zip(rounds["/predict"], rounds["/predict-one"], strict=True)]
    return {"kernels": args.kernels, "concurrency": args.concurrency,
            "duration": args.duration, "rounds": rounds, "summary": summary,
            "ratio": round(ratio, 2), "ratio_per_round": per_round,
            "mean_batch_size": round(mean_batch, 2)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"rps": round(statistics.median(r["rps"] for r in runs), 1),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 2),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 2),
            "requests": sum(r["requests"] for r in runs),
            "wrong": sum(r["wrong"] for r in runs), "failed": sum(r["failed"] for r in runs),
            "server_cpu_ms_per_req": round(statistics.median(
                r["server_cpu_ms_per_req"] for r in runs), 3),
            "kernel_cpu_ms_per_req": round(statistics.median(
                r["kernel_cpu_ms_per_req"] for r in runs), 3)}


# ----- streaming -------------------------------------------------------------------------

async def timed_chunks(port: int, path: str) -> dict[str, Any]:
    """Seconds from sending the request to each chunk, and the words in the order they came."""
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
            times, data = [], b""
            async for chunk in resp.content.iter_any():
                times.append(time.monotonic() - started)
                data += chunk
            return {"status": resp.status, "times": times, "body": data.decode()}


def words_of(body: str, mode: str) -> list[str]:
    if mode == "chunked":
        return body.split()
    if "data: " not in body:  # Kernel Gateway: the printed lines, all at the end
        return [json.loads(line)["word"] for line in body.splitlines() if line]
    return [json.loads(event[6:])["word"] for event in body.split("\n\n")
            if event.startswith("data: ")]


def phase_streaming(args: argparse.Namespace) -> dict[str, Any]:
    paths = {"chunked": "/generate-text?words=5&pause=0.2", "sse": "/generate?words=5&pause=0.2"}
    out: dict[str, Any] = {}
    kinds = ["kgpool"] + (["kernel-gateway"] if (VENV_KG / "bin" / "python").exists() else [])
    for kind in kinds:
        server = Served(kind, STREAMING, 1)
        try:
            server.wait("/_kgpool/readyz" if kind == "kgpool" else "/generate-text?words=1")
            reference = None
            for mode, path in paths.items():
                runs = [asyncio.run(timed_chunks(server.port, path))
                        for _ in range(args.stream_requests)]
                words = [words_of(r["body"], mode) for r in runs]
                reference = reference or words[0]
                first = sorted(r["times"][0] * 1000 for r in runs)
                last = sorted(r["times"][-1] * 1000 for r in runs)
                out[f"{kind} {mode}"] = {
                    "requests": len(runs),
                    "first_chunk_ms_median": round(statistics.median(first), 1),
                    "first_chunk_ms_max": round(first[-1], 1),
                    "last_chunk_ms_median": round(statistics.median(last), 1),
                    "chunks_median": statistics.median(len(r["times"]) for r in runs),
                    "in_order": all(w == reference and len(w) == 5 for w in words),
                    "statuses": sorted({r["status"] for r in runs}),
                }
                log(f"streaming {kind} {mode}: {out[f'{kind} {mode}']}")
        finally:
            server.stop()
    return out


# ----- report ----------------------------------------------------------------------------

def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Model serving: batching and streaming ({result['started']})", "",
             (f"`{result['command']}` on {result['cores']} cores, load average "
              f"{result['loadavg_start'][0]:.2f} at the start, {result['seconds']} s. Ratios "
              "within this run are the result; absolute numbers move with the machine."), ""]
    b = result.get("batching")
    if b:
        lines += ["## Batching", "",
                  (f"`deploy/notebooks/batched_model.ipynb`, {b['kernels']} kernels, "
                   f"{b['concurrency']} concurrent clients with distinct inputs, "
                   f"{len(b['ratio_per_round'])} rounds x {b['duration']:g} s per endpoint, "
                   "taking turns; one BLAS/OpenMP thread per kernel. Every answer is checked "
                   "against the model's answer for that client's own input."), "",
                  ("| endpoint | req/s | p50 ms | p99 ms | requests | wrong | failed | "
                   "server CPU ms/req | kernel CPU ms/req |"),
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for path, s in b["summary"].items():
            lines.append(f"| `POST {path}` | {s['rps']} | {s['p50_ms']} | {s['p99_ms']} | "
                         f"{s['requests']} | {s['wrong']} | {s['failed']} | "
                         f"{s['server_cpu_ms_per_req']} | {s['kernel_cpu_ms_per_req']} |")
        lines += ["", (f"Batched / unbatched throughput: **{b['ratio']}x** (per round: "
                       f"{', '.join(map(str, b['ratio_per_round']))}); mean batch size "
                       f"{b['mean_batch_size']}."), ""]
    s = result.get("streaming")
    if s:
        lines += ["## Streaming", "",
                  ("`deploy/notebooks/streaming.ipynb`: five words printed 200 ms apart "
                   "(`?words=5&pause=0.2`), one request at a time; milliseconds from sending "
                   "the request."), "",
                  ("| server, mode | first chunk (median) | first chunk (max) | last chunk "
                   "(median) | chunks | words in order |"),
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for name, r in s.items():
            lines.append(f"| {name} | {r['first_chunk_ms_median']} | {r['first_chunk_ms_max']}"
                         f" | {r['last_chunk_ms_median']} | {r['chunks_median']} | "
                         f"{'yes' if r['in_order'] else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


def estimate(args: argparse.Namespace) -> dict[str, float]:
    """Seconds each phase should take on an idle machine, from the options: the model's
    answers and its kernels' training, warm-ups, the measured runs; each streamed request
    lasts about a second (five words 200 ms apart)."""
    skip = set(args.skip.split(","))
    out = {}
    if "batching" not in skip:
        out["batching"] = 8 + 2 * 1.0 + args.rounds * 2 * (args.duration + 0.2)
    if "streaming" not in skip:
        servers = 2 if (VENV_KG / "bin" / "python").exists() else 1
        out["streaming"] = servers * (3 + 2 * args.stream_requests * 1.05)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bash benchmarks/run.sh serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--stream-requests", type=int, default=10)
    p.add_argument("--skip", default="", help="batching,streaming")
    p.add_argument("--name", default=None,
                   help="write results/NAME.{md,json}: `--name serving` updates the committed "
                   "results (default: results/local/serving-<time>.*, not in git)")
    args = p.parse_args(argv)
    LOGS.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    began = time.monotonic()
    planned = estimate(args)
    log(f"this run takes about {minutes(sum(planned.values()))} on an idle machine ("
        + ", ".join(f"{phase} {minutes(s)}" for phase, s in planned.items())
        + "); longer when the machine is busy")
    result: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["bash", "benchmarks/run.sh", "serving", *argv]),
        "cores": os.cpu_count(), "loadavg_start": os.getloadavg(), "args": vars(args)}
    if "batching" not in skip:
        result["batching"] = phase_batching(args)
    if "streaming" not in skip:
        result["streaming"] = phase_streaming(args)
    result["seconds"] = round(time.monotonic() - began, 1)
    result["estimated_s"] = round(sum(planned.values()))
    result["leftover_processes"] = procs.leftovers()
    base = output_base(args.name, "serving")
    base.parent.mkdir(parents=True, exist_ok=True)
    base.parent.joinpath(base.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
    base.parent.joinpath(base.name + ".md").write_text(markdown(result))
    log(f"wrote {base.relative_to(REPO)}.md and .json; took {minutes(result['seconds'])} "
        f"(estimated {minutes(result['estimated_s'])})")
    return 1 if result["leftover_processes"] else 0


if __name__ == "__main__":
    procs.run_main(main, log)
