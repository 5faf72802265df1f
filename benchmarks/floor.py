"""Raw jupyter_client floor: the cost of the Jupyter protocol with no HTTP server in front.

Starts K kernels with jupyter_client's async API, runs the notebook's init code on each,
then drives them from C concurrent workers (a shared FIFO of idle kernels) for a fixed time in
three modes and prints one JSON object on stdout:

  two   - two execute_requests per request: `REQUEST = "..."`, then the cell
          (what Kernel Gateway does)
  one   - one execute_request per request: `REQUEST = "..."` + newline + the cell
  pass  - one execute_request of `pass` (the protocol's fixed cost, no output)

Each execute waits for the shell execute_reply and for iopub `status: idle` of its own msg_id,
collecting stdout, as a robust client must.  Output of `two` and `one` is checked byte for byte.

Usage: python floor.py --kernels 2 --concurrency 1,16 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import sys
import time

from jupyter_client.manager import AsyncKernelManager

INIT = "import math\nimport json"
CELL = (
    "req = json.loads(REQUEST)\n"
    "angle = req['args']['angle'][0]\n"
    "print(json.dumps({'convertedAngle': math.radians(float(angle))}))"
)
EXPECTED = '{"convertedAngle": 3.141592653589793}\n'
REQUEST_OBJ = {
    "body": "",
    "args": {"angle": ["180"]},
    "path": {},
    "headers": {"Host": "127.0.0.1:8888", "User-Agent": "floor", "Accept": "*/*"},
}


def request_assignment() -> str:
    # Kernel Gateway's form: a Python string literal holding the JSON text.
    return "REQUEST = " + json.dumps(json.dumps(REQUEST_OBJ))


async def execute(kc, code: str) -> str:
    """One execute_request; returns stdout; raises on error."""
    msg_id = kc.execute(code, silent=False, store_history=False, allow_stdin=False)
    out: list[str] = []
    error = None
    while True:
        msg = await kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        mtype = msg["msg_type"]
        content = msg["content"]
        if mtype == "stream" and content.get("name") == "stdout":
            out.append(content["text"])
        elif mtype == "error":
            error = f"{content['ename']}: {content['evalue']}"
        elif mtype == "status" and content["execution_state"] == "idle":
            break
    while True:
        reply = await kc.get_shell_msg(timeout=30)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    if error:
        raise RuntimeError(error)
    return "".join(out)


def make_request(mode: str):
    assign = request_assignment()
    one = assign + "\n" + CELL

    async def run(kc) -> str:
        if mode == "two":
            await execute(kc, assign)
            return await execute(kc, CELL)
        if mode == "one":
            return await execute(kc, one)
        return await execute(kc, "pass")

    return run


class FairPool:
    """Idle kernels handed to waiters strictly first come, first served.

    (asyncio.Queue lets a worker that just released a kernel take it straight back,
    starving the others and inflating tail latency.)
    """

    def __init__(self, clients) -> None:
        self.idle = collections.deque(clients)
        self.waiters: collections.deque = collections.deque()

    async def get(self):
        if self.idle and not self.waiters:
            return self.idle.popleft()
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        return await fut

    def put(self, kc) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(kc)
                return
        self.idle.append(kc)


async def drive(clients, mode: str, concurrency: int, duration: float) -> dict:
    idle = FairPool(clients)
    call = make_request(mode)
    latencies: list[float] = []
    wrong = 0
    errors = 0
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal wrong, errors
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            kc = await idle.get()
            try:
                body = await call(kc)
            except Exception:  # noqa: BLE001 - counted, reported
                errors += 1
                body = None
            finally:
                idle.put(kc)
            latencies.append(time.perf_counter() - t0)
            if body is not None and mode != "pass" and body != EXPECTED:
                wrong += 1

    t_start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t_start
    latencies.sort()
    n = len(latencies)

    def pct(p: float) -> float:
        return latencies[min(n - 1, int(p / 100 * n))] * 1000 if n else float("nan")

    return {
        "mode": mode,
        "kernels": len(clients),
        "concurrency": concurrency,
        "requests": n,
        "rps": n / elapsed if elapsed else 0.0,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "mean_ms": statistics.fmean(latencies) * 1000 if n else float("nan"),
        "errors": errors,
        "wrong_bodies": wrong,
    }


async def main_async(args) -> dict:
    managers: list[AsyncKernelManager] = []
    clients = []
    try:
        for _ in range(args.kernels):
            km = AsyncKernelManager(kernel_name=args.kernel_name)
            managers.append(km)
            await km.start_kernel()
            kc = km.client()
            kc.start_channels()
            await kc.wait_for_ready(timeout=60)
            clients.append(kc)
        for kc in clients:
            await execute(kc, INIT)
        print(json.dumps({"event": "kernels", "count": len(clients)}), file=sys.stderr, flush=True)
        results = []
        for mode in args.modes.split(","):
            for conc in [int(c) for c in args.concurrency.split(",")]:
                await drive(clients, mode, conc, min(0.5, args.duration))  # warm-up
                results.append(await drive(clients, mode, conc, args.duration))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        return {"results": results}
    finally:
        for kc in clients:
            kc.stop_channels()
        for km in managers:
            try:
                await km.shutdown_kernel(now=True)
            except Exception:  # noqa: BLE001 - best effort; the driver kills leftovers by pid
                pass


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--kernels", type=int, default=2)
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--modes", default="two,one,pass")
    p.add_argument("--kernel-name", default="python3")
    args = p.parse_args()
    out = asyncio.run(main_async(args))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
