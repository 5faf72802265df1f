"""The command line as a user runs it: flags, environment, exit codes, signals, no leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import EXAMPLE, NOTEBOOKS, Server, kernel_children, wait_gone

pytestmark = pytest.mark.timeout(120)
# no kernel starts: the same on both channels (tests/run.sh's KGPOOL_CHANNEL=jupyter pass skips)
no_kernel = pytest.mark.channel_independent


def run(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> \
        subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kgpool", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})


def test_example_notebook_readme_flow() -> None:
    with Server(EXAMPLE) as server:
        resp = server.get("/convert?angle=180")
        assert resp.status == 200
        assert resp.text.strip() == '{"convertedAngle": 3.141592653589793}'
        assert server.get("/convert").text.strip() == '{"convertedAngle": null}'


@no_kernel
def test_version_and_help() -> None:
    from kgpool import __version__
    assert run("--version").stdout.strip() == f"kgpool {__version__}"
    helptext = run("serve", "--help").stdout
    for flag in ("--kernels", "--host", "--port", "--kernel-name", "--timeout", "--max-queue",
                 "--max-requests", "--shutdown-timeout", "--log-format", "--log-level"):
        assert flag in helptext
    assert "(default: 127.0.0.1)" in helptext and "(default: 8888)" in helptext
    assert "KGPOOL_KERNELS" in helptext


@no_kernel
def test_routes_lists_endpoints() -> None:
    out = run("routes", str(NOTEBOOKS / "kitchen.ipynb"))
    assert out.returncode == 0
    assert "GET     /hello/world" in out.stdout
    assert "POST    /created" in out.stdout and "ResponseInfo cells [21]" in out.stdout
    lines = out.stdout.splitlines()
    assert lines.index(next(x for x in lines if "/hello/world" in x)) < \
        lines.index(next(x for x in lines if "/hello/:name" in x))


@no_kernel
@pytest.mark.parametrize("notebook,message", [
    ("no_endpoints.ipynb", "has no endpoint"),
    ("bad_annotation.ipynb", "cell 1 ('# get /lowercase') looks like an endpoint annotation"),
    ("missing.ipynb", "cannot read notebook"),
])
def test_unusable_notebook_fails_fast(notebook: str, message: str) -> None:
    for command in ("routes", "serve"):
        out = run(command, str(NOTEBOOKS / notebook), timeout=30)
        assert out.returncode != 0
        assert message in out.stderr


def test_init_failure_stops_startup_and_leaves_no_kernel() -> None:
    server = Server(NOTEBOOKS / "init_fails.ipynb", "--kernels", "3").start(ready=False)
    assert server.proc is not None
    code = server.proc.wait(60)
    log = server.output()
    assert code == 1
    assert "init cell 2 ('x = 1')" in log and "ZeroDivisionError: division by zero" in log
    assert wait_gone(kernel_children(server.proc.pid)) == []
    server.stop()


def test_flags_from_environment() -> None:
    server = Server(EXAMPLE, env={"KGPOOL_KERNELS": "2", "KGPOOL_TIMEOUT": "7",
                                  "KGPOOL_LOG_FORMAT": "json"})
    with server:
        assert server.get("/readyz").json()["kernels"]["desired"] == 2
        assert len(server.kernel_pids()) == 2
        assert server.get("/convert?angle=0").status == 200
    assert '"logger": "kgpool.access"' in server.output()


def test_flag_beats_environment() -> None:
    with Server(EXAMPLE, "--kernels", "1", env={"KGPOOL_KERNELS": "2"}) as server:
        assert server.get("/readyz").json()["kernels"]["desired"] == 1


@no_kernel
def test_bad_environment_value_is_a_clear_error() -> None:
    out = run("serve", str(EXAMPLE), env={"KGPOOL_KERNELS": "many"})
    assert out.returncode != 0 and "KGPOOL_KERNELS='many'" in out.stderr


def test_requests_run_in_parallel_on_separate_kernels(tmp_path: Path) -> None:
    with Server(NOTEBOOKS / "kitchen.ipynb", "--kernels", "4") as server:
        # each request waits in its cell until four requests are in cells at the same time:
        # on fewer than four kernels at once they could never all meet
        with ThreadPoolExecutor(4) as ex:
            replies = list(ex.map(lambda _: server.get(f"/meet?n=4&dir={tmp_path}"), range(4)))
        assert [r.status for r in replies] == [200] * 4
        assert {r.text.split()[0] for r in replies} == {"met"}
        assert len({r.text.split()[1] for r in replies}) == 4  # four kernel PIDs


def test_requests_wait_in_fifo_order() -> None:
    with Server(NOTEBOOKS / "kitchen.ipynb", "--kernels", "1") as server:
        with ThreadPoolExecutor(4) as ex:
            first = ex.submit(server.get, "/sleep?s=1")
            server.wait_pool("the first request to run", busy=1)
            queued = []
            for n in range(3):
                queued.append(ex.submit(server.request, "POST", "/created"))
                server.wait_pool("the request to queue", queued=n + 1)
            assert first.result().status == 200
            hits = [f.result().json()["hits"] for f in queued]
        assert hits == sorted(hits)


def test_requests_before_warm_wait_instead_of_failing() -> None:
    server = Server(NOTEBOOKS / "init_sleeps.ipynb").start(ready=False)
    try:
        deadline = time.monotonic() + 30
        while True:  # the port opens before the kernels are warm
            try:
                ready = server.get("/readyz")
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert ready.status == 503
        assert server.get("/healthz").status == 200
        resp = server.get("/ok")
        assert (resp.status, resp.text) == (200, "ok")
    finally:
        server.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown_finishes_in_flight(sig: int) -> None:
    server = Server(NOTEBOOKS / "kitchen.ipynb", "--kernels", "2").start()
    with ThreadPoolExecutor(3) as ex:
        in_flight = [ex.submit(server.get, "/sleep?s=2") for _ in range(3)]  # one queued
        server.wait_pool("two running and one queued", busy=2, queued=1)
        assert server.proc is not None
        server.proc.send_signal(sig)
        server.wait_pool("the drain to start", status="not ready")
        late = server.get("/state", timeout=5)  # the listener stays open while it drains
        assert (late.status, late.json()["error"]) == (503, "draining")
        assert [f.result().status for f in in_flight] == [200, 200, 200]
    assert server.stop(sig) == 0


def test_a_tmpdir_too_long_for_unix_sockets_still_serves(tmp_path: Path) -> None:
    """Unix socket paths stop at 107 bytes: below a long TMPDIR the kernels go over TCP and
    the Jupyter channel, said in the log, instead of failing to start."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    server = Server(EXAMPLE, "--kernels", "1", env={"TMPDIR": str(deep)}).start()
    try:
        response = server.get("/convert?angle=180")
        assert response.status == 200
        assert response.json() == {"convertedAngle": 3.141592653589793}
        assert "too long a path for Unix sockets" in server.output()
    finally:
        server.stop()


def test_kernels_exit_when_the_server_is_killed(tmp_path: Path) -> None:
    """Even SIGKILL of kgpool leaves no kernel: ipykernel watches its parent (JPY_PARENT_PID)."""
    # a SIGKILLed kgpool cannot remove its runtime folder (connection files): not in /tmp
    server = Server(EXAMPLE, "--kernels", "2", env={"TMPDIR": str(tmp_path)}).start()
    kernels = server.kernel_pids()
    assert len(kernels) == 2
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait(10)
    assert wait_gone(kernels, timeout=15) == []
    assert len(list(tmp_path.glob("kgpool-*"))) == 1  # nothing of kgpool's ran to remove it
    server.stop()  # which removes it then (tests/conftest.py): it held the kernels' keys
    assert not list(tmp_path.glob("kgpool-*"))
