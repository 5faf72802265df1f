"""Shared fixtures: real kgpool servers in subprocesses, test notebooks, and leak checks."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hygiene import pytest_configure, pytest_sessionfinish, pytest_unconfigure

__all__ = ["pytest_configure", "pytest_sessionfinish", "pytest_unconfigure"]  # pytest's hooks
ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = Path(__file__).resolve().parent / "notebooks"
EXAMPLE = ROOT / "deploy" / "notebooks" / "convert.ipynb"
# tests/run.sh's fork pass: every server (and in-process service) runs --fork
FORK = os.environ.get("KGPOOL_FORK", "") not in ("", "0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kernel_children(pid: int) -> list[int]:
    """Live ipykernel processes started by pid (jupyter_client tells each its JPY_PARENT_PID),
    found even after they were orphaned."""
    found = []
    marker = f"JPY_PARENT_PID={pid}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"ipykernel" not in (entry / "cmdline").read_bytes():
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in env and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def serving_kernels(pid: int) -> list[int]:
    """The kernels that serve requests: pid's own kernel children, or with --fork the workers
    (the children of the templates, which are pid's own children). Not a kernel's own child:
    between vfork and exec (debugpy runs `uname -p` as ipykernel starts) it has the kernel's
    command line and environment, and it would count as one more kernel."""
    kernels = kernel_children(pid)
    own = [k for k in kernels if parent(k) == pid]
    if not FORK:
        return own
    templates = set(own)
    return [k for k in kernels if parent(k) in templates]


def init_kernels(pid: int) -> list[int]:
    """The kernels that ran the init cells: every kernel, or with --fork the templates (pid's
    own kernel children; the workers are theirs)."""
    return [k for k in kernel_children(pid) if parent(k) == pid]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def runtime_folders(kernels: list[int]) -> set[Path]:
    """kgpool's runtime folders (kgpool-* under TMPDIR: sockets, connection files, the kernels'
    TMPDIRs), found from the connection file on each kernel's command line."""
    found = set()
    for pid in kernels:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in argv:
            folder = Path(os.fsdecode(arg)).parent
            if arg.endswith(b".json") and folder.name.startswith("kgpool-"):
                found.add(folder)
    return found


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def write_atomically(path: Path, book: Any) -> None:
    """Replace a notebook file in one step, as editors and ConfigMap updates do: a reload
    never reads half of it."""
    import nbformat
    tmp = path.with_suffix(".tmp")
    nbformat.write(book, tmp)
    tmp.replace(path)


def python_notebook(path: Path, *cells: str) -> Path:
    """A Python notebook of these code cells, written atomically (cell ids c0, c1, ...)."""
    import nbformat
    book = nbformat.v4.new_notebook()
    book.metadata = {"kernelspec": {"name": "python3", "display_name": "P",
                                    "language": "python"},
                     "language_info": {"name": "python"}}
    book.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    for i, cell in enumerate(book.cells):
        cell["id"] = f"c{i}"
    write_atomically(path, book)
    return path


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll until predicate() is true: waiting for an event, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body)


class PortTaken(AssertionError):
    """The server could not listen: some other process took its free port first."""


class Server:
    """`python -m kgpool serve` in a subprocess on a free loopback port."""

    def __init__(self, notebook: Path | str | list[Path | str], *args: str,
                 env: dict[str, str] | None = None, base: str = "") -> None:
        self.port = free_port()
        self.base = base  # the --base-url the server was given, without its trailing /
        self.cwd: Path | None = None
        self.https: ssl.SSLContext | None = None  # set for a server that speaks TLS
        notebooks = notebook if isinstance(notebook, list) else [notebook]
        self.args = [sys.executable, "-m", "kgpool", "serve", *map(str, notebooks),
                     "--port", str(self.port), *args]
        # Without PYTEST_CURRENT_TEST: ipykernel stops watching fd 1 under pytest, and the
        # kernels here must run as in production.
        self.env = {k: v for k, v in {**os.environ, **(env or {})}.items()
                    if k != "PYTEST_CURRENT_TEST"}
        self.proc: subprocess.Popen[bytes] | None = None
        self.kernels: list[int] = []
        self.runtime: set[Path] = set()  # kgpool's own folders, removed here after a SIGKILL
        self._log = b""

    def start(self, ready: bool = True, timeout: float = 60.0) -> Server:
        for attempt in range(3):
            # A file, not a pipe: a full pipe would block the server's logging mid-test.
            self._logfile = tempfile.TemporaryFile()
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=self._logfile,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.cwd)
            if not ready:
                return self
            try:
                self.wait_ready(timeout)
                return self
            except PortTaken:
                if attempt == 2:
                    raise
                self.move_port()  # another process took the free port first: another one
        return self

    def move_port(self) -> None:
        """A new free port, wherever the command line or the environment named the old one."""
        old, self.port = str(self.port), free_port()
        new = str(self.port)
        self.args = [new if a == old else a[:-len(old)] + new
                     if a.startswith("--") and a.endswith("=" + old) else a for a in self.args]
        self.env = {k: new if v == old and k.endswith("PORT") else v
                    for k, v in self.env.items()}

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                log = self.output()
                self._logfile.close()
                taken = f", {self.port}): address already in use" in log
                raise (PortTaken if taken else AssertionError)(
                    f"server exited {self.proc.returncode}: {log}")
            try:
                ready = self.request("GET", self.base + "/_kgpool/readyz", timeout=2)
                # ready serves once one kernel is warm; tests start when all of them are
                if ready.status == 200 and ready.json()["kernels"]["starting"] == 0:
                    self.kernels = kernel_children(self.proc.pid)
                    self.runtime |= runtime_folders(self.kernels)
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("server not ready in time")

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30.0) -> Response:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout,
                                           context=self.https) if self.https else \
            http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return Response(resp.status, dict(resp.getheaders()), resp.read())
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def pool(self) -> dict[str, Any]:
        """kgpool's own /readyz (idle, busy, queued...), whatever the notebook defines."""
        body = self.get(self.base + "/_kgpool/readyz").json()
        return {**body["kernels"], "queued": body["queued"], "status": body["status"]}

    def wait_pool(self, what: str, timeout: float = 30.0, **wanted: Any) -> None:
        """Wait until the pool's counts are the wanted ones (busy=1, queued=2...)."""
        wait_for(lambda: all(self.pool()[k] == v for k, v in wanted.items()), timeout,
                 f"{what} ({wanted})")

    def metric(self, name: str, labels: str = "") -> float:
        """The sum of a metric's samples whose labels include all of `labels` (a="x",b="y");
        a metric with no such sample is an error, not 0."""
        wanted = [part for part in labels.split(",") if part]
        found, total = False, 0.0
        for line in self.get(self.base + "/_kgpool/metrics").text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                series = line.rsplit(" ", 1)[0]
                if all(part in series for part in wanted):
                    found, total = True, total + float(line.rsplit(" ", 1)[1])
        assert found, f"no sample of {name} with {labels}"
        return total

    def kernel_pids(self) -> list[int]:
        """The kernels that serve (with --fork: the workers, not the templates)."""
        assert self.proc is not None
        return serving_kernels(self.proc.pid)

    def init_kernels(self) -> list[int]:
        """The kernels that ran the init cells (with --fork: the templates)."""
        assert self.proc is not None
        return init_kernels(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        """Signal the server, wait for it, and check that no kernel it ever had survives."""
        assert self.proc is not None
        seen = set(self.kernels) | set(kernel_children(self.proc.pid))
        self.runtime |= runtime_folders(sorted(seen))
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("server did not stop after " + signal.Signals(sig).name) from None
        if code == -signal.SIGKILL:  # nothing of kgpool's ran to remove its folder
            self.remove_runtime()
        self.output()
        if not self._logfile.closed:
            self._logfile.close()
        left = wait_gone(sorted(seen))
        for pid in left:  # clean up before failing, then fail loudly
            os.kill(pid, signal.SIGKILL)
        assert not left, f"kernel processes outlived the server: {left}"
        return code

    def kill(self) -> None:
        """SIGKILL, and remove what kgpool could not: its runtime folder (the keys of its
        kernels' connection files), once its kernels, which watch it, are gone too."""
        assert self.proc is not None
        kids = kernel_children(self.proc.pid)
        self.kernels = sorted(set(self.kernels) | set(kids))
        self.runtime |= runtime_folders(kids)
        self.proc.kill()
        self.proc.wait()
        self.remove_runtime()

    def remove_runtime(self) -> None:
        wait_gone(self.kernels, timeout=10)
        for folder in self.runtime:
            shutil.rmtree(folder, ignore_errors=True)
            if folder.parent.name.startswith("kgpool-tmp-"):  # the private TMPDIR of sealing
                shutil.rmtree(folder.parent, ignore_errors=True)

    def output(self) -> str:
        """Everything the server has logged so far."""
        if not self._logfile.closed:
            self._logfile.seek(0)
            self._log = self._logfile.read()
        return self._log.decode("utf-8", errors="replace")

    def __enter__(self) -> Server:
        try:
            return self.start()
        except BaseException:  # never leave a half-started server (and its kernels) behind
            if self.proc is not None and self.proc.poll() is None:
                self.kill()
            if not self._logfile.closed:
                self._logfile.close()
            raise

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


class KGServer(Server):
    """kgpool started the way Kernel Gateway is (`jupyter kernelgateway` with one word
    changed): Kernel Gateway's options only, its config files looked up in `config_dir`."""

    def __init__(self, *kg_args: str, config_dir: Path, env: dict[str, str] | None = None,
                 port_option: bool = True, base: str = "") -> None:
        super().__init__([], env={"JUPYTER_CONFIG_DIR": str(config_dir), **(env or {})},
                         base=base)
        port = [f"--KernelGatewayApp.port={self.port}"] if port_option else []
        self.args = [sys.executable, "-m", "kgpool", *kg_args, *port]


@pytest.fixture(autouse=True)
def no_leaked_kernels() -> Iterator[None]:
    """Every test leaves no kernel process started by this pytest process."""
    yield
    left = wait_gone(kernel_children(os.getpid()), timeout=10)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"test left kernel processes behind: {left}"


@pytest.fixture(scope="module")
def kitchen() -> Iterator[Server]:
    """One server on the kitchen-sink notebook, shared by a module's tests (2 kernels)."""
    server = Server(NOTEBOOKS / "kitchen.ipynb", "--kernels", "2", "--timeout", "10")
    with server:
        yield server
