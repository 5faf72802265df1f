"""--fork against classic kernels (issue 15), side by side in one run, on a notebook whose init
cells allocate a 400 MB numpy array and sleep 5 s (a model being loaded):

1. memory: total PSS of the kernels of --kernels 4 (classic: 4 kernels; --fork: the template and
   4 workers) after every kernel served requests, against one classic kernel;
2. recovery: a serving kernel SIGKILLed under load (--kernels 2, 4 clients): seconds until its
   replacement starts a request, and every request's status and latency against its deadline;
3. burst: from 1 busy kernel to 8 concurrent clients (--kernels 1 --max-kernels 8): seconds until
   8 distinct kernels have started a request, then until the pool is back to 1 (--idle-timeout).

Times are read from the kernels themselves: the endpoint answers with its pid and the wall clock
when it started. Writes benchmarks/results/NAME.{json,md}; server logs in results/logs/fork/.
Run with `bash benchmarks/fork.sh [--help]`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import procs

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LOGS = RESULTS / "logs" / "fork"
MIB = 2**20


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def write_notebook(path: Path, megabytes: int, sleep: float) -> None:
    import nbformat

    book = nbformat.v4.new_notebook()
    book.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                    "language": "python"}, "language_info": {"name": "python"}}
    book.cells = [nbformat.v4.new_code_cell(c) for c in (
        ("import json, os, time\nimport numpy as np\n"
        f"MODEL = np.random.default_rng(0).random({megabytes} * 2**20 // 8)  # the 'model'\n"
        f"time.sleep({sleep})  # the rest of a slow load"),
        ("# GET /predict\nargs = json.loads(REQUEST)['args']\nstarted = time.time()\n"
        "y = float(MODEL[::64].sum())  # reads every page of the model\n"
        "time.sleep(float(args.get('wait', ['0'])[0]))\n"
        "print(json.dumps({'pid': os.getpid(), 'started': started, 'y': y}), end='')"))]
    nbformat.write(book, path)


class Server:
    """kgpool serve in its own session (procs.Managed cleans up after it)."""

    def __init__(self, name: str, notebook: Path, port: int, *flags: str) -> None:
        cmd = [sys.executable, "-m", "kgpool", "serve", str(notebook), "--port", str(port),
               *flags]
        self.name, self.port, self.flags = name, port, flags
        self.proc = procs.Managed(name, cmd, str(LOGS / f"{name}.log"))

    def get(self, path: str, timeout: float = 60.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def pool(self) -> dict:
        return json.loads(self.get("/_kgpool/readyz", 5)[1])["kernels"]

    def wait_ready(self, timeout: float = 300.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not self.proc.running():
                raise RuntimeError(f"{self.name} exited: see {self.proc.log_path}")
            try:
                if self.get("/_kgpool/readyz", 2)[0] == 200 and self.pool()["starting"] == 0:
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout}s")

    def kernels(self) -> dict[int, str]:
        """pid -> role (kernel, template, worker) of every live kernel process."""
        self.proc.refresh()
        found = {}
        for pid in procs.descendants(self.proc.pid):
            if procs.is_kernel(pid):
                ppid = (procs.read_stat(pid) or (0,))[0]
                found[pid] = "kernel" if ppid == self.proc.pid else "worker"
        if "--fork" in self.flags:
            found = {p: "template" if r == "kernel" else r for p, r in found.items()}
        return found

    def serving(self) -> list[int]:
        return [p for p, role in self.kernels().items() if role != "template"]

    def stop(self) -> None:
        self.proc.stop()


def smaps(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0]) * 1024
    return {"pss": fields["Pss"], "rss": fields["Rss"],
            "private": fields["Private_Clean"] + fields["Private_Dirty"]}


def load(server: Server, requests: int, threads: int, wait: float = 0.0) -> list[dict]:
    answers: list[dict] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(requests // threads):
            status, body = server.get(f"/predict?wait={wait}")
            assert status == 200, (status, body[:200])
            with lock:
                answers.append(json.loads(body))

    pool = [threading.Thread(target=client) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return answers


# ----- 1. memory --------------------------------------------------------------------------

def phase_memory(args: argparse.Namespace, nb: Path) -> dict:
    out: dict = {}
    for name, kernels, flags in (("one-kernel", 1, ()), ("classic", 4, ()),
                                 ("fork", 4, ("--fork",))):
        server = Server(f"memory-{name}", nb, args.port, "--kernels", str(kernels), *flags)
        try:
            ready = server.wait_ready()
            answers = load(server, args.requests * kernels, kernels)
            served = {}
            for answer in answers:
                served[answer["pid"]] = served.get(answer["pid"], 0) + 1
            processes = [{"pid": pid, "role": role, "served": served.get(pid, 0), **smaps(pid)}
                         for pid, role in sorted(server.kernels().items())]
        finally:
            server.stop()
        total = sum(p["pss"] for p in processes)
        out[name] = {"kernels": kernels, "ready_s": round(ready, 2), "processes": processes,
                     "total_pss": total, "requests": len(answers)}
        log(f"memory {name}: {len(processes)} process(es), total PSS {total / MIB:.0f} MiB "
            f"after {len(answers)} requests (ready in {ready:.1f}s)")
    one = out["one-kernel"]["total_pss"]
    for name in ("classic", "fork"):
        out[name]["ratio_to_one_kernel"] = round(out[name]["total_pss"] / one, 3)
    return out


# ----- 2. recovery -------------------------------------------------------------------------

class Load:
    """Closed-loop clients that record every answer (or failure) until stopped."""

    def __init__(self, server: Server, clients: int, wait: float, deadline: float) -> None:
        self.server, self.wait, self.deadline = server, wait, deadline
        self.records: list[dict] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client) for _ in range(clients)]

    def client(self) -> None:
        while not self.stop.is_set():
            sent = time.time()
            try:
                status, body = self.server.get(f"/predict?wait={self.wait}", self.deadline + 10)
                answer = json.loads(body) if status == 200 else {}
            except OSError as exc:
                status, answer = 0, {"error": str(exc)}
            with self.lock:
                self.records.append({"sent": sent, "seconds": time.time() - sent,
                                     "status": status, **answer})

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def first_start_by(self, pids: set[int], after: float) -> float | None:
        with self.lock:
            starts = [r["started"] for r in self.records
                      if r.get("pid") in pids and r["started"] >= after]
        return min(starts) if starts else None


def wait_until(check, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.01)
    raise RuntimeError(f"timed out waiting for {what}")


def phase_recovery(args: argparse.Namespace, nb: Path) -> dict:
    out: dict = {}
    for name, flags in (("classic", ()), ("fork", ("--fork",))):
        server = Server(f"recovery-{name}", nb, args.port, "--kernels", "2", "--timeout",
                        str(args.deadline), *flags)
        kills = []
        try:
            server.wait_ready()
            with Load(server, 4, 0.02, args.deadline) as work:
                wait_until(lambda: len(work.records) > 20, 60, "load")
                for _ in range(args.kills):
                    before = set(server.serving())
                    victim = sorted(before)[0]
                    killed = time.time()
                    os.kill(victim, signal.SIGKILL)
                    wait_until(lambda s=server, b=before: len(set(s.serving()) - b) == 1, 120,
                               "the replacement process")
                    new = set(server.serving()) - before
                    wait_until(lambda n=new, k=killed: work.first_start_by(n, k), 120,
                               "the replacement to serve")
                    serves = work.first_start_by(new, killed) - killed  # type: ignore[operator]
                    kills.append({"victim": victim, "replacement": sorted(new),
                                  "serves_again_s": round(serves, 3)})
                    log(f"recovery {name}: pid {victim} SIGKILLed, its slot serves again "
                        f"after {serves:.3f}s")
                    count = len(work.records)
                    wait_until(lambda c=count: len(work.records) > c + 20, 60, "more load")
        finally:
            server.stop()
        records = work.records
        statuses: dict[str, int] = {}
        for r in records:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        slowest = max(r["seconds"] for r in records)
        out[name] = {"kills": kills, "requests": len(records), "statuses": statuses,
                     "slowest_s": round(slowest, 3), "deadline_s": args.deadline,
                     "within_deadline": slowest < args.deadline,
                     "serves_again_p50_s": round(statistics.median(
                         k["serves_again_s"] for k in kills), 3)}
    return out


# ----- 3. burst ------------------------------------------------------------------------------

def phase_burst(args: argparse.Namespace, nb: Path) -> dict:
    out: dict = {}
    for name, flags, rounds in (("classic", (), args.classic_burst_rounds),
                                ("fork", ("--fork",), args.burst_rounds)):
        if rounds <= 0:
            continue
        server = Server(f"burst-{name}", nb, args.port, "--kernels", "1", "--max-kernels", "8",
                        "--idle-timeout", str(args.idle_timeout), "--timeout", "120", *flags)
        results = []
        try:
            server.wait_ready()
            for number in range(rounds):
                results.append(burst_round(server, args))
                log(f"burst {name} round {number + 1}: 8 kernels serve after "
                    f"{results[-1]['eight_serve_s']:.3f}s, back to 1 after "
                    f"{results[-1]['shrink_s']:.1f}s")
        finally:
            server.stop()
        out[name] = {"rounds": results, "eight_serve_p50_s": round(statistics.median(
            r["eight_serve_s"] for r in results), 3)}
    return out


def burst_round(server: Server, args: argparse.Namespace) -> dict:
    busy = Load(server, 1, args.burst_wait, 120)
    with busy:
        wait_until(lambda: busy.records, 60, "the busy kernel")
        start = time.time()
        with Load(server, 7, args.burst_wait, 120) as burst:
            def kernels() -> set[int]:
                with busy.lock, burst.lock:
                    return {r["pid"] for r in busy.records + burst.records
                            if r.get("started", 0) >= start - 1}
            wait_until(lambda: len(kernels()) >= 8, 120, "8 kernels serving")
            with busy.lock, burst.lock:
                firsts: dict[int, float] = {}
                for r in busy.records + burst.records:
                    if "pid" in r:
                        firsts[r["pid"]] = min(firsts.get(r["pid"], 1e18), r["started"])
            eighth = sorted(firsts.values())[7]
    stopped = time.monotonic()
    statuses = {r["status"] for r in busy.records + burst.records}
    wait_until(lambda: server.pool()["idle"] + server.pool()["busy"] == 1 and
               len(server.serving()) == 1, args.idle_timeout + 60, "the shrink to 1")
    return {"eight_serve_s": round(max(0.0, eighth - start), 3),
            "shrink_s": round(time.monotonic() - stopped, 2), "statuses": sorted(statuses)}


# ----- report --------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    mem, rec, burst = result["memory"], result["recovery"], result["burst"]
    lines = [f"# --fork against classic kernels ({result['started']})", "",
             (f"`{result['command']}` — {result['cores']} cores, "
             f"{result['mem_gib']} GiB, load {result['loadavg_start']} → "
             f"{result['loadavg_end']}; notebook: init allocates {result['args']['megabytes']} "
             f"MB (numpy) and sleeps {result['args']['init_sleep']} s; the endpoint reads "
             "every page of it."), ""]
    if mem:
        lines += ["## Memory: total PSS of the kernels", "",
                  "| setup | processes | total PSS | × one kernel | ready in |",
                  "| --- | --- | --- | --- | --- |"]
        for name in ("one-kernel", "classic", "fork"):
            m = mem[name]
            roles = ", ".join(f"{p['role']} {p['pss'] / MIB:.0f} MiB (private "
                              f"{p['private'] / MIB:.0f}, {p['served']} req)"
                              for p in m["processes"])
            lines.append(f"| {name} (--kernels {m['kernels']}) | {roles} | "
                         f"{m['total_pss'] / MIB:.0f} MiB | "
                         f"{m.get('ratio_to_one_kernel', 1.0):.2f} | {m['ready_s']} s |")
        lines.append("")
    if rec:
        lines += ["## Recovery: a serving kernel SIGKILLed under load (--kernels 2, 4 clients)",
                  "", ("| mode | slot serves again (each kill) | p50 | requests | statuses | "
                  "slowest / deadline |"), "| --- | --- | --- | --- | --- | --- |"]
        for name, r in rec.items():
            each = ", ".join(f"{k['serves_again_s']:.3f} s" for k in r["kills"])
            lines.append(f"| {name} | {each} | {r['serves_again_p50_s']:.3f} s | "
                         f"{r['requests']} | {r['statuses']} | {r['slowest_s']:.2f} s / "
                         f"{r['deadline_s']:g} s |")
        lines.append("")
    if burst:
        lines += [("## Burst: 1 busy kernel, then 8 concurrent clients "
                  "(--kernels 1 --max-kernels 8)"), "",
                  "| mode | until 8 kernels serve (each round) | p50 | back to 1 kernel after |",
                  "| --- | --- | --- | --- |"]
        for name, b in burst.items():
            each = ", ".join(f"{r['eight_serve_s']:.3f} s" for r in b["rounds"])
            shrink = ", ".join(f"{r['shrink_s']:.1f} s" for r in b["rounds"])
            lines.append(f"| {name} | {each} | {b['eight_serve_p50_s']:.3f} s | {shrink} "
                         f"(--idle-timeout {result['args']['idle_timeout']:g}) |")
        lines.append("")
    lines.append(f"Leftover processes after the run: {result['leftover_processes'] or 'none'}.")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="issue15-fork", help="results/NAME.{md,json}")
    p.add_argument("--skip", default="", help="phases to skip: memory,recovery,burst")
    p.add_argument("--megabytes", type=int, default=400, help="size of the init cells' array")
    p.add_argument("--init-sleep", type=float, default=5.0, help="seconds the init cells sleep")
    p.add_argument("--requests", type=int, default=250, help="memory: requests per kernel")
    p.add_argument("--kills", type=int, default=3, help="recovery: SIGKILLs per mode")
    p.add_argument("--deadline", type=float, default=10.0, help="recovery: kgpool --timeout")
    p.add_argument("--burst-rounds", type=int, default=5, help="burst: rounds with --fork")
    p.add_argument("--classic-burst-rounds", type=int, default=1,
                   help="burst: rounds without --fork (8 x the model's memory each)")
    p.add_argument("--burst-wait", type=float, default=0.5,
                   help="burst: seconds each request takes (sleeps after computing)")
    p.add_argument("--idle-timeout", type=float, default=5.0, help="burst: --idle-timeout")
    p.add_argument("--port", type=int, default=18990)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    LOGS.mkdir(parents=True, exist_ok=True)
    nb = LOGS / "model.ipynb"
    write_notebook(nb, args.megabytes, args.init_sleep)
    skip = set(args.skip.split(","))
    result: dict = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["bash", "benchmarks/fork.sh", *argv]), "args": vars(args),
        "cores": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
    }
    result["memory"] = {} if "memory" in skip else phase_memory(args, nb)
    result["recovery"] = {} if "recovery" in skip else phase_recovery(args, nb)
    result["burst"] = {} if "burst" in skip else phase_burst(args, nb)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["leftover_processes"] = procs.leftovers()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    log(f"wrote {RESULTS / args.name}.md and .json")
    return 1 if result["leftover_processes"] else 0


if __name__ == "__main__":
    procs.run_main(main, log)
