"""--fork with real kernels: workers forked from a template serve as kernels do; faults are
injected by killing workers and templates; refusals and warnings; memory-based recycling."""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest
from conftest import (
    NOTEBOOKS,
    Server,
    alive,
    kernel_children,
    parent,
    python_notebook,
    wait_for,
    wait_gone,
    write_atomically,
)

from kgpool.memory import MIB, MemoryWatch, TemplateInfo, Usage, usage

# It chooses its channel and mode itself: the other passes of tests/run.sh leave it out.
pytestmark = [pytest.mark.timeout(180), pytest.mark.channel_independent]
FORKED = NOTEBOOKS / "forked.ipynb"


# Stated on every command line: tests/run.sh's other passes set KGPOOL_CHANNEL / KGPOOL_FORK.
CLASSIC = ("--no-fork", "--channel", "direct")


class Fork(Server):
    """A --fork server: its kernels are the workers, its templates are apart."""

    def __init__(self, notebook: Path | str, *args: str, **kw: object) -> None:
        super().__init__(notebook, "--fork", "--channel", "direct", *args,
                         **kw)  # type: ignore[arg-type]

    def __enter__(self) -> Fork:
        super().__enter__()
        return self

    def kernel_pids(self) -> list[int]:
        templates = set(self.templates())
        assert self.proc is not None
        return [k for k in kernel_children(self.proc.pid) if parent(k) in templates]

    def templates(self) -> list[int]:
        return self.init_kernels()


def warm(server: Server) -> int:
    status = server.pool()
    return int(status["idle"] + status["busy"])


def test_workers_are_forked_from_one_template_and_serve() -> None:
    with Fork(FORKED, "--kernels", "3") as server:
        (template,) = server.templates()
        workers = server.kernel_pids()
        assert len(workers) == 3
        states = [server.get("/state").json() for _ in range(6)]
        assert {s["init_runs"] for s in states} == {1}  # the init cells ran once, in the template
        assert {s["template"] for s in states} == {template}
        assert {s["ppid"] for s in states} == {template}
        assert {s["pid"] for s in states} == set(workers)  # the template itself never serves
        assert {s["sum"] for s in states} == {499999500000.0}
        by_pid = {s["pid"]: s["random"] for s in states}
        assert len(set(by_pid.values())) == 3  # numpy's generator was reseeded in each worker
        assert "Python thread" not in server.output()  # numpy's native threads: no refusal
        # memory of each slot and of the template: private and pss
        wait_for(lambda: 'slot="2"' in server.get("/_kgpool/metrics").text, what="samples")
        samples = [line for line in server.get("/_kgpool/metrics").text.splitlines()
                   if line.startswith("kgpool_kernel_memory_bytes{")]
        assert len(samples) == 8
        # kgpool cannot wait for a process it did not start: the template reaps, and reports
        resp = server.get("/exit")
        assert resp.status == 502 and resp.json()["error"] == "kernel_died"
        wait_for(lambda: warm(server) == 3, what="the slot refilled")
        assert server.metric("kgpool_kernel_exits_total", 'status="exit code 3"') == 1
        assert "exited unexpectedly: exit code 3" in server.output()


def test_worker_answers_have_the_jupyter_channels_shape() -> None:
    """Endpoints the direct channel compiles, and those it refuses (top-level await), which the
    worker runs through the shell's run_cell: the same answers as classic kernels give."""
    paths = [("GET", "/expr"), ("GET", "/raise"), ("GET", "/await"), ("GET", "/await-value"),
             ("GET", "/await-raise"), ("POST", "/await-info"), ("GET", "/stderr")]

    def answers(server: Server) -> list[tuple[int, str, str, str]]:
        found = []
        for method, path in paths:
            resp = server.request(method, path, body=b"sent")
            body = resp.text.split()[0] if path == "/await" else resp.text  # "awaited PID"
            found.append((resp.status, resp.headers.get("Content-Type", ""),
                          resp.headers.get("X-Kind", ""), body))
        return found

    with Server(FORKED, "--kernels", "1", *CLASSIC) as classic:
        expected = answers(classic)
    with Fork(FORKED, "--kernels", "1") as server:
        assert answers(server) == expected
        assert "runs through the shell's run_cell" in server.output()
    assert expected[2][3] == "awaited" and expected[5][0] == 201 and expected[5][2] == "await"
    assert expected[1][0] == expected[4][0] == 500


def test_chaos_worker_sigkill_under_load() -> None:
    timeout = 5.0
    with Fork(FORKED, "--kernels", "2", "--timeout", str(timeout)) as server:
        (template,) = server.templates()
        results: list[tuple[int, float]] = []
        lock = threading.Lock()
        stop = time.monotonic() + 6

        def client() -> None:
            for _ in range(400):
                if time.monotonic() > stop:
                    return
                started = time.monotonic()
                status = server.get("/sleep?s=0.02", timeout=timeout + 10).status
                with lock:
                    results.append((status, time.monotonic() - started))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        kills, rng = 0, random.Random(11)
        while time.monotonic() < stop - 1:
            # a warm worker: one killed while it is forked and connected is a failed warm-up
            wait_for(lambda: warm(server) == 2 and len(server.kernel_pids()) == 2,
                     what="two warm workers")
            victim = rng.choice(server.kernel_pids())
            os.kill(victim, signal.SIGKILL)
            kills += 1
            wait_for(lambda v=victim: v not in server.kernel_pids(), what="the victim to go")
            time.sleep(0.5)  # load between kills (not synchronisation)
        for t in threads:
            t.join(60)
        assert kills >= 4
        assert {status for status, _ in results} <= {200, 502}
        assert max(seconds for _, seconds in results) < timeout + 2
        assert sum(1 for status, _ in results if status == 200) > len(results) / 2
        wait_for(lambda: warm(server) == 2 and len(server.kernel_pids()) == 2,
                 what="two workers again")
        assert server.templates() == [template]  # workers died; the template never did
        # kgpool cannot wait for a process it did not start: the template reaps, and reports
        exits = server.metric("kgpool_kernel_exits_total", 'status="signal 9 (SIGKILL)"')
        assert exits == kills
        assert server.metric("kgpool_kernel_restarts_total", 'reason="crash"') == kills
        assert [server.get("/state").status for _ in range(6)] == [200] * 6


def test_chaos_template_sigkill_rewarms_every_slot() -> None:
    with Fork(FORKED, "--kernels", "2") as server:
        (template,) = server.templates()
        workers = server.kernel_pids()
        os.kill(template, signal.SIGKILL)
        assert wait_gone(workers) == []  # PR_SET_PDEATHSIG: the workers die with it
        wait_for(lambda: len(server.templates()) == 1 and server.templates() != [template]
                 and len(server.kernel_pids()) == 2 and warm(server) == 2, timeout=60,
                 what="a new template and two workers")
        states = [server.get("/state").json() for _ in range(4)]
        assert {s["template"] for s in states} == set(server.templates())
        assert {s["init_runs"] for s in states} == {1}
        assert server.metric("kgpool_kernel_exits_total", 'status="template died"') == 2
        assert server.metric("kgpool_kernel_exits_total", 'status="signal 9 (SIGKILL)"') == 1
        assert f"template (pid {template}) exited unexpectedly" in server.output()


def test_timeout_in_a_worker_says_where_and_kills_its_process_group(tmp_path: Path) -> None:
    marker = tmp_path / "child"
    with Fork(FORKED, "--kernels", "1", "--timeout", "2") as server:
        (worker,) = server.kernel_pids()
        resp = server.get(f"/hang-with-child?file={marker}")
        assert resp.status == 504
        child = int(marker.read_text())
        assert wait_gone([worker, child]) == []  # the worker's whole group was killed
        wait_for(lambda: "was stopped past its deadline; it was running" in server.output(),
                 what="the stack dump in the log")
        # faulthandler in the worker: the cell's loop (line 1 is the REQUEST binding)
        assert re.search(r"line [67] in <module>", server.output())
        assert server.get("/state").status == 200  # a fresh worker took the slot


def test_server_sigkill_leaves_no_template_or_worker(tmp_path: Path) -> None:
    # a SIGKILLed kgpool cannot remove its runtime folder (connection files): not in /tmp
    server = Fork(FORKED, "--kernels", "2", env={"TMPDIR": str(tmp_path)})
    with server:
        assert server.proc is not None
        everything = kernel_children(server.proc.pid)
        assert len(everything) == 3
        server.proc.kill()  # no shutdown at all: the template's parent watch, then PDEATHSIG
        server.proc.wait()
        assert wait_gone(everything, timeout=20) == []
        assert len(list(tmp_path.glob("kgpool-*"))) == 1  # nothing of kgpool's ran to remove it
        server.stop()  # which removes it then (tests/conftest.py): it held the kernels' keys
    assert not list(tmp_path.glob("kgpool-*"))


def write_notebook(path: Path, version: int) -> None:
    python_notebook(path, f"import os\nVERSION = {version}",
                    "# GET /v\nprint(VERSION, os.getppid(), end='')")


def test_reload_forks_the_new_version_from_a_new_template(tmp_path: Path) -> None:
    path = tmp_path / "live.ipynb"
    write_notebook(path, 1)
    with Fork(path, "--kernels", "2") as server:
        (old,) = server.templates()
        assert {server.get("/v").text for _ in range(4)} == {f"1 {old}"}
        write_notebook(path, 2)
        wait_for(lambda: server.get("/v").text.startswith("2 "), timeout=60, what="version 2")
        wait_for(lambda: not alive(old) and len(server.templates()) == 1
                 and len(server.kernel_pids()) == 2, timeout=30,
                 what="the old template shut down once its workers retired")
        (new,) = server.templates()
        assert {server.get("/v").text for _ in range(4)} == {f"2 {new}"}
        assert server.metric("kgpool_kernel_restarts_total", 'reason="reload"') == 2
        assert "v1 template" in server.output() and "shut down: no worker needs it" in \
            server.output()


def test_the_pool_grows_by_forking(tmp_path: Path) -> None:
    with Fork(NOTEBOOKS / "kitchen.ipynb", "--kernels", "1", "--max-kernels", "3",
              "--scale-up-delay", "0.05", "--idle-timeout", "2") as server:
        with ThreadPoolExecutor(3) as ex:
            replies = list(ex.map(lambda _: server.get(f"/meet?n=3&dir={tmp_path}",
                                                       timeout=60), range(3)))
        assert [r.text.split()[0] for r in replies] == ["met"] * 3
        assert server.metric("kgpool_pool_resizes_total", 'direction="up"') == 2
        assert server.output().count("forked from the template") == 3
        assert len(server.templates()) == 1  # growth forks: no second warm-up
        wait_for(lambda: len(server.kernel_pids()) == 1, timeout=30, what="the shrink")


# ----- refusals and warnings ----------------------------------------------------------------

def refused(*args: str) -> str:
    server = Server(*args)  # type: ignore[arg-type]
    server.start(ready=False)
    assert server.proc is not None
    code = server.proc.wait(60)
    log = server.output()
    server.stop()
    assert code != 0, log
    return log


def test_init_cells_that_leave_a_thread_are_refused_unless_allowed() -> None:
    log = refused(str(NOTEBOOKS / "fork_thread.ipynb"), "--fork")
    assert "--fork refused" in log and "'poller'" in log and "--fork-allow-threads" in log
    with Fork(NOTEBOOKS / "fork_thread.ipynb", "--fork-allow-threads") as server:
        assert server.get("/pid").status == 200
        assert "left Python threads running (--fork-allow-threads): 'poller'" in server.output()


def test_initialised_cuda_is_refused() -> None:
    log = refused(str(NOTEBOOKS / "fork_cuda.ipynb"), "--fork")
    assert "--fork refused: torch.cuda is initialised" in log


def test_fork_needs_a_python_kernel_and_the_direct_channel() -> None:
    log = refused(str(NOTEBOOKS / "lang_bash.ipynb"), "--fork")  # the bash kernel
    assert "--fork needs a Python kernel" in log and "a bash kernel" in log
    log = refused(str(FORKED), "--channel", "jupyter", "--fork")
    assert "--fork serves through the direct channel" in log


def test_descriptors_opened_by_init_cells_are_left_alone_with_a_warning() -> None:
    with Fork(NOTEBOOKS / "fork_fds.ipynb") as server:
        pid, fd = server.get("/pid").text.split()
        log = server.output()
        assert "every forked worker shares with the template" in log
        assert "socket:[" in log and "/dev/null" in log and "os.register_at_fork" in log
        assert os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")  # still the socket


def test_object_heavy_state_is_called_out() -> None:
    with Fork(NOTEBOOKS / "fork_objects.ipynb", "--kernels", "1") as server:
        assert server.get("/touch").status == 200
        wait_for(lambda: "--fork saves little memory here" in server.output(), timeout=30,
                 what="the object-heavy warning")


# ----- memory -------------------------------------------------------------------------------

@pytest.mark.parametrize("fork", [False, True], ids=["classic", "fork"])
def test_max_kernel_memory_recycles_gracefully(fork: bool) -> None:
    server = Fork(FORKED, "--kernels", "1", "--max-kernel-memory", "150M") if fork else \
        Server(FORKED, "--kernels", "1", "--max-kernel-memory", "150M", *CLASSIC)
    with server:
        def private() -> float:
            return server.metric("kgpool_kernel_memory_bytes", 'slot="0",kind="private"')

        def recycled() -> bool:
            return server.metric("kgpool_kernel_restarts_total", 'reason="memory"') >= 1

        wait_for(lambda: "kgpool_kernel_memory_bytes{" in server.get("/_kgpool/metrics").text,
                 what="a memory sample")
        if fork:
            assert server.metric("kgpool_kernel_memory_bytes", 'slot="template",kind="pss"') > 0
        first = server.kernel_pids()
        statuses = []
        for _ in range(8):  # 40 MiB more each: past the limit after a few
            statuses.append(server.get("/grow?mb=40").status)
            grown = 40 * MIB * len(statuses)
            wait_for(lambda g=grown: recycled() or private() >= g, timeout=10, what="a sample")
            if recycled():
                break
        assert recycled() and statuses == [200] * len(statuses)
        wait_for(lambda: not set(first) & set(server.kernel_pids()) and
                 len(server.kernel_pids()) == 1, timeout=30, what="the big kernel retired")
        assert server.get("/grow?mb=1").text.split()[0] == "1"  # a fresh kernel
        assert "more than --max-kernel-memory (150 MiB): replacing it" in server.output()


class _Pool:
    def __init__(self, leases: list[object]) -> None:
        self.leases, self.recycled = leases, []  # type: ignore[var-annotated]

    def members(self) -> list[object]:
        return self.leases

    def recycle(self, lease: object, reason: str) -> None:
        self.recycled.append((lease, reason))


class _Lease:
    def __init__(self, slot: int, served: int, version: int = 1) -> None:
        self.slot, self.served, self.version = slot, served, version
        self.retiring = self.stopped = False


def test_object_heavy_is_judged_against_the_init_cells_state(caplog: pytest.LogCaptureFixture,
                                                              ) -> None:
    template = TemplateInfo(1, 10, 400 * MIB)
    watch = MemoryWatch(_Pool([]), limit=0, report=lambda _: None,  # type: ignore[arg-type]
                        templates=lambda: [template])
    cases = [(_Lease(0, 5), 20 * MIB, False),  # numpy-like: a few private pages
             (_Lease(1, 0), 390 * MIB, False),  # has not served: nothing to judge yet
             (_Lease(2, 1), 390 * MIB, True)]  # object-heavy: it copied nearly everything
    for lease, private, warns in cases:
        caplog.clear()
        watch._object_heavy(lease, Usage(private, private, private), [template])  # type: ignore
        assert ("saves little memory" in caplog.text) is warns
    caplog.clear()
    watch._object_heavy(_Lease(3, 9), Usage(390 * MIB, 0, 0), [template])  # type: ignore
    assert caplog.text == ""  # once per version
    small = TemplateInfo(2, 11, 8 * MIB)
    watch._object_heavy(_Lease(4, 9, 2), Usage(8 * MIB, 0, 0), [small])  # type: ignore
    assert caplog.text == ""  # a small state is not worth a warning


def test_a_reload_to_a_refused_version_keeps_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "live.ipynb"
    write_notebook(path, 1)
    with Fork(path, "--kernels", "1") as server:
        book = nbformat.read(path, as_version=4)
        book.cells[0].source += ("\nimport threading\n"
                                 "threading.Thread(target=threading.Event().wait, name='stuck',"
                                 " daemon=True).start()")
        write_atomically(path, book)
        wait_for(lambda: server.get("/readyz").json()["notebooks"]["live"]["reload_error"],
                 timeout=60, what="the reload to be refused")
        # /readyz says so (its reason only to a client with the token); the log has it
        assert "refused" in server.get("/readyz").json()["notebooks"]["live"]["reload_error"]
        assert "--fork refused" in server.output() and "'stuck'" in server.output()
        assert server.get("/v").text.startswith("1 ")
        wait_for(lambda: len(server.templates()) == 1, what="the refused template gone")


def test_usage_reads_private_memory_from_smaps_rollup() -> None:
    mine = usage(os.getpid())
    assert mine is not None and 0 < mine.private <= mine.rss and 0 < mine.pss <= mine.rss
    assert usage(0) is None  # no such process
