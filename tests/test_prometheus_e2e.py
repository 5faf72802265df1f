"""End to end: a real Prometheus scrapes a real kgpool; exact counters come back through its API.

Needs Debian's `prometheus` package (the server and promtool); CI installs it. Everything runs on
127.0.0.1 on free ports, and every process started here is stopped by PID in the teardown.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "tests" / "notebooks" / "obs_endpoints.ipynb"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "kgpool-dashboard.json"
OUR_ROUTES = {"/ok", "/boom", "/sleep", "unmatched"}
TIMEOUT = 2.0  # kgpool --timeout of the load test
BURST_SLEEP = 0.6  # queued request: waits one BURST_SLEEP, runs one: 1.2 s < TIMEOUT
BURST = 6  # 2 kernels + 1 queue slot accept 3, the rest must be rejected with 503
FORK = os.environ.get("KGPOOL_FORK", "") not in ("", "0")  # tests/run.sh's fork pass

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="needs the prometheus server and promtool (Debian package `prometheus`)",
)

# Never send loopback traffic through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _load_obscheck() -> Any:
    spec = importlib.util.spec_from_file_location(
        "obscheck", ROOT / "deploy" / "prometheus" / "obscheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["obscheck"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


obscheck = _load_obscheck()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 30.0) -> tuple[int, bytes]:
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


def wait_for(what: str, check: Any, timeout: float, proc: subprocess.Popen[bytes] | None = None,
             log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except (OSError, urllib.error.URLError):
            result = None
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"timed out waiting for {what}\n{tail}")


# ---- processes --------------------------------------------------------------------------------

def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, cmdline) for every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry)] = (int(fields[1]), fields[0], cmd)
    return table


def kernel_descendants(pid: int) -> set[int]:
    table = _proc_table()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, (pp, _, _) in table.items() if pp in frontier}
        found |= frontier
    return {p for p in found if "ipykernel" in table[p][2]}


def serving_kernels(pid: int) -> set[int]:
    """The kernels that serve: with --fork (tests/run.sh's fork pass), the workers, which are
    the templates' children."""
    kernels = kernel_descendants(pid)
    if not FORK:
        return kernels
    table = _proc_table()
    return {p for p in kernels if p in table and table[p][0] in kernels}


def alive(pid: int) -> bool:
    entry = _proc_table().get(pid)
    return entry is not None and entry[1] not in ("Z", "X")


@dataclass
class Process:
    """A child process started by this test, with its log file; stop() is idempotent."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    kernels_seen: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, grace: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start(name: str, argv: list[str], log: Path, **kwargs: Any) -> Process:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, **kwargs)
    return Process(name, proc, log)


@pytest.fixture
def kgpool(tmp_path: Path) -> Iterator[tuple[Process, str]]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    server = start("kgpool", [
        sys.executable, "-m", "kgpool", "serve", str(NOTEBOOK), "--kernels", "2",
        "--host", "127.0.0.1", "--port", str(port), "--timeout", str(int(TIMEOUT)),
        "--max-queue", "1"], tmp_path / "kgpool.log", env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("kgpool /readyz", lambda: get(f"{url}/readyz", 2)[0] == 200, 90,
                 server.proc, server.log)
        server.kernels_seen |= kernel_descendants(server.pid)
        yield server, url
    finally:
        server.kernels_seen |= kernel_descendants(server.pid)
        server.stop()
        leftovers = [p for p in server.kernels_seen if alive(p)]
        for pid in leftovers:  # ours: started by the kgpool we started; never leave them
            os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"ipykernel processes outlived kgpool: {leftovers}"


@pytest.fixture
def prometheus(tmp_path: Path, kgpool: tuple[Process, str]) -> Iterator[str]:
    _, kg_url = kgpool
    port = free_port()
    config = tmp_path / "p.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{
            "job_name": "kgpool",
            "static_configs": [{"targets": [kg_url.removeprefix("http://")]}],
        }],
    }))
    server = start("prometheus", [
        "prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}"], tmp_path / "prometheus.log", cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("prometheus /-/ready", lambda: get(f"{url}/-/ready", 2)[0] == 200, 30,
                 server.proc, server.log)
        # Prometheus applies discovered targets on a 5 s tick: wait for the first scrape, so
        # that every series gets samples before, during and after the load (rate() needs two).
        wait_for("the first scrape of kgpool",
                 lambda: query(url, 'up{job="kgpool"} == 1'), 30, server.proc, server.log)
        yield url
    finally:
        server.stop(grace=15)


# ---- Prometheus and /metrics reading ------------------------------------------------------

def query(prom: str, expr: str) -> list[dict[str, Any]]:
    status, body = get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    reply = json.loads(body)
    assert status == 200 and reply["status"] == "success", (expr, reply)
    return list(reply["data"]["result"])


def scalar(prom: str, expr: str) -> float:
    result = query(prom, expr)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def scrape(url: str) -> str:
    status, body = get(f"{url}/metrics")
    assert status == 200
    return body.decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in an exposition (the sum if several match)."""
    _, samples = obscheck.parse_exposition(text)
    found = [s.value for s in samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert found, f"no sample {name}{labels} in /metrics"
    return float(sum(found))


def wait_for_scrape_after(prom: str, moment: float) -> None:
    """Waits until Prometheus holds a kgpool sample scraped after `moment` (unix time)."""
    def fresh() -> bool:
        res = query(prom, 'timestamp(kgpool_build_info{job="kgpool"})')
        return bool(res) and float(res[0]["value"][1]) > moment
    wait_for("a Prometheus scrape after the load", fresh, 20)


# ---- the load -----------------------------------------------------------------------------

def send_known_load(url: str) -> Counter[tuple[str, str]]:
    """7x200, 3x500, 2x404, 1x504; returns (route label, code) -> count actually received."""
    got: Counter[tuple[str, str]] = Counter()
    for route, path, n in (("/ok", "/ok", 7), ("/boom", "/boom", 3),
                           ("unmatched", "/missing", 1), ("unmatched", "/missing/deeper", 1),
                           ("/sleep", "/sleep?s=5", 1)):
        for _ in range(n):
            status, _ = get(url + path)
            got[(route, str(status))] += 1
    assert got == Counter({("/ok", "200"): 7, ("/boom", "500"): 3, ("unmatched", "404"): 2,
                           ("/sleep", "504"): 1}), got
    return got


def send_burst(url: str) -> tuple[Counter[tuple[str, str]], str]:
    """BURST concurrent slow requests against 2 kernels and a queue of 1. Returns the codes
    received and a /metrics exposition taken while one request was waiting in the queue."""
    with ThreadPoolExecutor(max_workers=BURST) as pool:
        futures = [pool.submit(get, f"{url}/sleep?s={BURST_SLEEP}") for _ in range(BURST)]
        during = scrape(url)  # /metrics never queues: poll it until a request is seen waiting
        while sample(during, "kgpool_queue_depth") == 0 and not all(f.done() for f in futures):
            time.sleep(0.02)
            during = scrape(url)
        codes = Counter(("/sleep", str(f.result()[0])) for f in futures)
    return codes, during


@pytest.mark.timeout(120)
def test_prometheus_reads_exact_counts(kgpool: tuple[Process, str], prometheus: str) -> None:
    server, url = kgpool
    started = time.monotonic()
    expected = send_known_load(url)
    # The 504 cost a kernel: wait for its replacement, so the burst meets two warm kernels.
    wait_for("two idle kernels after the timeout", lambda: sample(
        scrape(url), "kgpool_kernels", state="idle") == 2, 60, server.proc, server.log)
    server.kernels_seen |= kernel_descendants(server.pid)

    burst, during = send_burst(url)
    expected += burst
    n503 = burst[("/sleep", "503")]
    n504 = expected[("/sleep", "504")]
    assert n503 >= 1, f"the bounded queue rejected nothing: {burst}"
    assert sample(during, "kgpool_queue_depth") == 1, "queue depth while a request waited"
    assert sample(during, "kgpool_requests_in_flight") >= 3, "2 running + 1 queued in flight"
    after = scrape(url)
    assert sample(after, "kgpool_queue_depth") == 0
    assert sample(after, "kgpool_requests_in_flight") == 0

    # Kill one idle kernel (a grandchild this test started, by PID): a "crash" restart.
    victims = sorted(serving_kernels(server.pid))
    server.kernels_seen |= set(victims)
    assert len(victims) == 2, victims
    os.kill(victims[0], signal.SIGKILL)
    wait_for("the crash restart and two idle kernels again", lambda: (
        (text := scrape(url)) and sample(text, "kgpool_kernel_restarts_total", reason="crash") == 1
        and sample(text, "kgpool_kernels", state="idle") == 2), 60, server.proc, server.log)
    server.kernels_seen |= kernel_descendants(server.pid)
    load_done = time.time()

    wait_for_scrape_after(prometheus, load_done)
    seen = Counter({
        (r["metric"]["route"], r["metric"]["code"]): int(float(r["value"][1]))
        for r in query(prometheus, 'sum by (route, method, code) '
                                   '(kgpool_http_requests_total{job="kgpool"})')
        if r["metric"]["route"] in OUR_ROUTES and float(r["value"][1]) > 0
    })
    assert seen == expected, f"Prometheus has {dict(seen)}, we received {dict(expected)}"
    routes = {r["metric"]["route"] for r in query(prometheus, "kgpool_http_requests_total")}
    assert not {"/missing", "/missing/deeper", "/sleep?s=5"} & routes, routes
    assert {r["metric"]["method"] for r in query(
        prometheus, 'kgpool_http_requests_total{route=~"/ok|/boom|/sleep|unmatched"}')} == {"GET"}

    for route in ("/ok", "/boom", "/sleep"):
        total = sum(n for (r, _), n in expected.items() if r == route)
        assert scalar(prometheus, f'sum(kgpool_http_request_duration_seconds_count'
                                  f'{{route="{route}"}})') == total, route
    assert scalar(prometheus, "kgpool_kernels_desired") == 2
    assert scalar(prometheus, "kgpool_queue_capacity") == 1
    assert scalar(prometheus, 'sum(kgpool_requests_rejected_total{reason="queue_full"})') == n503
    assert scalar(prometheus, 'sum(kgpool_kernel_restarts_total{reason="timeout"})') == n504
    assert scalar(prometheus, 'sum(kgpool_kernel_restarts_total{reason="crash"})') == 1
    assert scalar(prometheus, 'sum(kgpool_kernels{state=~"idle|busy"})') == 2
    assert scalar(prometheus, "kgpool_queue_depth") == 0
    assert scalar(prometheus, "kgpool_build_info") == 1

    # Histogram buckets include the request timeout, so "slower than the deadline" is exact.
    les = {r["metric"]["le"] for r in query(
        prometheus, 'kgpool_http_request_duration_seconds_bucket{route="/ok"}')}
    assert any(le != "+Inf" and float(le) == TIMEOUT for le in les), sorted(les)

    check = subprocess.run(["promtool", "check", "metrics"], input=after.encode(),
                           capture_output=True, timeout=30, check=False)
    assert check.returncode == 0, (check.stdout + check.stderr).decode()

    _check_rules_loaded(prometheus)
    wait_for_scrape_after(prometheus, time.time())  # two scrapes after the load, for rate()
    _check_dashboard_queries(prometheus)
    assert time.monotonic() - started < 100

    server.kernels_seen |= kernel_descendants(server.pid)
    kernels = set(server.kernels_seen)
    assert server.stop() == 0, "kgpool did not exit 0 on SIGTERM"
    leftovers = [p for p in kernels if alive(p)]
    assert not leftovers, f"ipykernel processes outlived kgpool: {leftovers}"


def _check_rules_loaded(prom: str) -> None:
    """alerts.yml loads into the real server and every rule evaluates without error."""
    def evaluated() -> list[dict[str, Any]] | None:
        _status, body = get(f"{prom}/api/v1/rules")
        rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
        return rules if rules and all(r.get("health") != "unknown" for r in rules) else None

    rules = wait_for("alert rules evaluated", evaluated, 15)
    bad = [(r["name"], r.get("health"), r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    assert len(rules) == 7


def _check_dashboard_queries(prom: str) -> None:
    """Every dashboard query runs on the real server and returns series."""
    empty = []
    for where, expr in obscheck.dashboard_queries(DASHBOARD):
        expr = (expr.replace("$__rate_interval", "5m").replace("$job", ".*")
                .replace("$instance", ".*").replace("$route", ".*"))
        if expr.startswith("label_values("):
            continue  # Grafana syntax, not PromQL; its metric is checked by obscheck
        if not query(prom, expr):
            empty.append((where, expr))
    assert not empty, f"dashboard queries with no data after the load: {empty}"


@pytest.mark.timeout(120)
def test_exposition_follows_contract(tmp_path: Path) -> None:
    """Every contract family (deploy/prometheus/contract-metrics.txt) with its type, labels and
    label values; no id- or path-like labels; promtool clean."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    server = start("kgpool", [
        sys.executable, "-m", "kgpool", "serve", str(NOTEBOOK), "--kernels", "1",
        "--host", "127.0.0.1", "--port", str(port)], tmp_path / "kgpool.log", env=env,
        cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("kgpool /readyz", lambda: get(f"{url}/readyz", 2)[0] == 200, 90,
                 server.proc, server.log)
        server.kernels_seen |= kernel_descendants(server.pid)
        assert get(f"{url}/ok")[0] == 200
        assert get(f"{url}/nope/123")[0] == 404
        # kernel memory is sampled (every 2 s, the first once the pool is warm)
        text = wait_for("a memory sample", lambda: (t := scrape(url)) and
                        "kgpool_kernel_memory_bytes{" in t and t, 30, server.proc, server.log)
        problems = obscheck.check_exposition(text)
        assert not problems, "\n".join(problems)
        check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                               capture_output=True, timeout=30, check=False)
        assert check.returncode == 0, (check.stdout + check.stderr).decode()
    finally:
        server.kernels_seen |= kernel_descendants(server.pid)
        server.stop()
        leftovers = [p for p in server.kernels_seen if alive(p)]
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"ipykernel processes outlived kgpool: {leftovers}"
