"""Several notebooks on one server, and live reload without a failed request (issue 8)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    EXAMPLE,
    FORK,
    NOTEBOOKS,
    Server,
    kernel_children,
    parent,
    python_notebook,
    serving_kernels,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)


notebook = python_notebook


def test_two_notebooks_with_separate_pools(tmp_path: Path) -> None:
    other = notebook(tmp_path / "greeter.ipynb", "import os",
                     "# GET /hello/:name\nimport json\nprint('hi ' + json.loads(REQUEST)"
                     "['path']['name'], os.getpid(), end='')")
    with Server([EXAMPLE, other], "--kernels", "1", "--kernels-for", "greeter=2") as server:
        assert server.get("/convert/convert?angle=180").text.strip() == \
            '{"convertedAngle": 3.141592653589793}'
        answers = {server.get("/greeter/hello/ann").text for _ in range(6)}
        assert {a.split()[1] for a in answers} == {"ann"}
        greeter_pids = {a.split()[2] for a in answers}
        assert len(greeter_pids) == 2  # its own pool of two kernels
        assert server.get("/convert").status == 404  # no root mount with two notebooks
        ready = server.get("/readyz").json()
        assert ready["notebooks"]["convert"]["kernels"]["desired"] == 1
        assert ready["notebooks"]["greeter"]["kernels"]["desired"] == 2
        assert len(server.kernel_pids()) == 3
        assert server.metric("kgpool_http_requests_total",
                      'notebook="greeter",route="/hello/:name"') == 6
        spec = server.get("/_api/spec/swagger.json").json()
        assert set(spec["paths"]) == {"/convert/convert", "/greeter/hello/:name"}


def test_explicit_prefix_and_folder(tmp_path: Path) -> None:
    folder = tmp_path / "nbs"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / "a.ipynb")
    shutil.copy(EXAMPLE, folder / "b.ipynb")
    with Server(folder) as server:
        assert server.get("/a/convert?angle=0").status == 200
        assert server.get("/b/convert?angle=0").status == 200
    with Server(f"{EXAMPLE}=/v1/math") as server:
        assert server.get("/v1/math/convert?angle=0").status == 200
        assert server.get("/convert?angle=0").status == 404


def test_route_clash_is_a_start_up_error(tmp_path: Path) -> None:
    one = notebook(tmp_path / "one.ipynb", "# GET /x/y\nprint(1)")
    two = notebook(tmp_path / "two.ipynb", "# GET /y\nprint(2)")
    server = Server([one, f"{two}=/one/x"]).start(ready=False)
    assert server.proc is not None and server.proc.wait(30) != 0
    assert "route clash" in server.output()
    server.stop()


def test_endpoint_at_a_kgpool_path_takes_it(tmp_path: Path) -> None:
    # Kernel Gateway has no /healthz or /metrics, so its notebooks may define them
    ops = notebook(tmp_path / "ops.ipynb", "# GET /healthz\nprint('mine', end='')",
                   "# GET /:name\nprint('param', end='')")
    with Server(ops) as server:
        assert server.get("/healthz").text == "mine"
        assert server.get("/_kgpool/healthz").json() == {"status": "ok"}
        assert server.get("/readyz").status == 200  # a parameter never takes kgpool's paths
        assert server.get("/_kgpool/readyz").json()["status"] == "ready"
        assert "takes /healthz; kgpool's own /healthz stays at /_kgpool/healthz" in \
            server.output()
    server = Server(ops, "--strict").start(ready=False)
    assert server.proc is not None and server.proc.wait(30) == 2
    assert "--strict" in server.output()
    server.stop()


def load(server: Server, path: str, stop: threading.Event, results: list[tuple[int, str]]) -> None:
    for _ in range(3000):  # bounded in count as well as time: at most ~50/s, so >= 60 s
        if stop.is_set():
            return
        time.sleep(0.02)
        try:
            resp = server.get(path, timeout=30)
        except OSError as exc:  # recorded, so the test fails on it instead of stalling
            results.append((0, repr(exc)))
            continue
        results.append((resp.status, resp.text))


def test_reload_under_load_drops_nothing(tmp_path: Path) -> None:
    path = notebook(tmp_path / "live.ipynb", "VERSION = 1", "# GET /v\nprint(VERSION, end='')")
    with Server(path, "--kernels", "2") as server:
        old_kernels = set(server.kernel_pids())
        stop, results = threading.Event(), []  # type: ignore[var-annotated]
        threads = [threading.Thread(target=load, args=(server, "/v", stop, results))
                   for _ in range(3)]
        for t in threads:
            t.start()
        counts = []
        try:
            wait_for(lambda: len(results) > 10, what="load before the change")
            notebook(path, "VERSION = 2", "# GET /v\nprint(VERSION, end='')")

            def rolled() -> bool:  # every old kernel retired, two new ones serving
                pids = server.kernel_pids()
                counts.append(len(pids))
                return not old_kernels & set(pids) and len(pids) == 2
            try:
                wait_for(rolled, timeout=60, what="the roll to the new version")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; last answers {results[-3:]}; server log:\n"
                                     f"{server.output()[-3000:]}") from None
            done = len(results)
            wait_for(lambda: len(results) > done + 10, what="load after the roll")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        statuses = {status for status, _ in results}
        assert statuses == {200}, f"failed requests during reload: {statuses}"
        versions = [text for _, text in results]
        assert versions[0] == "1" and set(versions[done + 3:]) == {"2"}
        assert set(versions) == {"1", "2"}
        assert max(counts) <= 3  # rolling: at most one kernel more than the pool's two
        assert server.get("/readyz").json()["notebooks"]["live"]["reload_error"] is None


def test_kernel_counts_leave_out_a_kernels_own_children() -> None:
    """What made the roll above seem to run four kernels: a kernel's child between vfork and
    exec looks like a kernel. Here a stand-in kernel (an ipykernel command line with
    JPY_PARENT_PID set) keeps such a child alive."""
    code = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'import time; time.sleep(60)', 'ipykernel'])")
    env = {**os.environ, "JPY_PARENT_PID": str(os.getpid())}
    fake = subprocess.Popen([sys.executable, "-c", code, "ipykernel"], env=env,
                            stdin=subprocess.DEVNULL)
    children: list[int] = []
    try:
        def child_started() -> bool:
            children[:] = [k for k in kernel_children(os.getpid()) if parent(k) == fake.pid]
            return bool(children)
        wait_for(child_started, what="the stand-in kernel's child")
        counted = serving_kernels(os.getpid())
        if FORK:  # the stand-in is a template there: its child counts as its worker
            assert fake.pid not in counted and children[0] in counted
        else:
            assert fake.pid in counted and children[0] not in counted
    finally:
        for pid in [*children, fake.pid]:  # only what this test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        fake.wait(10)


def test_broken_new_version_is_refused_and_old_keeps_serving(tmp_path: Path) -> None:
    path = notebook(tmp_path / "live.ipynb", "VERSION = 1", "# GET /v\nprint(VERSION, end='')")
    with Server(path, "--kernels", "3") as server:
        serving = set(server.kernel_pids())
        notebook(path, "import time, random\ntime.sleep(random.random())\nVERSION = 2\n"
                       "raise RuntimeError('bad init')", "# GET /v\nprint(VERSION, end='')")
        wait_for(lambda: server.get("/readyz").json()["notebooks"]["live"]["reload_error"],
                 timeout=60, what="the reload to be refused")
        # the refused version's kernels, even those cut off while starting, are all gone
        wait_for(lambda: set(server.kernel_pids()) == serving, timeout=15,
                 what="only the serving kernels to remain")
        ready = server.get("/readyz").json()
        # no token configured: the reason (it quotes the init cell's exception) is in the log
        assert "bad init" not in ready["notebooks"]["live"]["reload_error"]
        assert "bad init" in server.output()
        assert ready["status"] == "ready"
        assert server.get("/v").text == "1"
        assert "new version refused" in server.output()
        path.write_text("{broken")
        wait_for(lambda: server.output().count("new version refused") == 2, timeout=30,
                 what="the unreadable version to be refused")
        assert "readable" in server.output().rsplit("new version refused", 1)[1]
        assert server.get("/v").text == "1"
        notebook(path, "VERSION = 3", "# GET /v\nprint(VERSION, end='')")
        wait_for(lambda: server.get("/v").text == "3", timeout=60, what="a good version")


def test_sighup_reloads(tmp_path: Path) -> None:
    import signal
    path = notebook(tmp_path / "live.ipynb", "import os", "# GET /pid\nprint(os.getpid(), end='')")
    with Server(path, "--no-reload") as server:
        before = server.get("/pid").text
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: server.get("/pid").text != before, timeout=60,
                 what="a new kernel after SIGHUP")
        assert server.get("/readyz").status == 200


def test_index_page_lists_endpoints() -> None:
    with Server(NOTEBOOKS / "kitchen.ipynb") as server:
        resp = server.get("/")
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/html")
        page = resp.text
        assert "data-kgpool-index" in page and "data-pool-status" in page
        assert "data-endpoint='GET /hello/:name'" in page
        assert "<input name='name' required>" in page
        assert "data-endpoint='POST /created'" in page




def test_sigterm_during_a_reload_leaves_no_kernel(tmp_path: Path) -> None:
    path = notebook(tmp_path / "live.ipynb", "VERSION = 1", "# GET /v\nprint(VERSION, end='')")
    server = Server(path, "--kernels", "2").start()
    before = len(server.init_kernels())  # with --fork: the new version warms a template first
    try:
        notebook(path, "import time\ntime.sleep(5)\nVERSION = 2",
                 "# GET /v\nprint(VERSION, end='')")
        wait_for(lambda: len(server.init_kernels()) > before, timeout=30,
                 what="the new version's kernels to start warming")
    except BaseException:
        server.stop()  # a failed wait must not leave the server and its kernels running
        raise
    assert server.stop() == 0  # stop() also checks that every kernel it saw is gone
