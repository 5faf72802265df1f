"""Kernel: one kernel process, its ZMQ channels, and a watch on its life."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import uuid
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager

from .errors import KernelDied, KernelError
from .outputs import ExecutionResult
from .wire import Wire

log = logging.getLogger(__name__)

# ipykernel's default shutdown wait is 5 s; a kernel about to be replaced earns less patience.
SHUTDOWN_GRACE = 1.0


def spec_language(kernel_name: str) -> str:
    """The language an installed kernel spec declares (its kernel.json), in lower case."""
    specs = KernelSpecManager()
    try:
        spec = specs.get_kernel_spec(kernel_name)
    except NoSuchKernel:
        found = ", ".join(sorted(specs.find_kernel_specs())) or "none"
        raise KernelError(f"no kernel spec named {kernel_name!r} is installed (installed: "
                          f"{found})") from None
    return str(spec.language or "").lower()


class Kernel:
    """A started kernel that runs one piece of code at a time and fails fast if it dies."""

    def __init__(self, kernel_name: str, *, context: zmq.asyncio.Context,
                 label: str = "kernel", on_death: Callable[[Kernel], None] | None = None,
                 cwd: str | None = None, ipc_dir: str | None = None,
                 tmp_dir: str | None = None) -> None:
        self.kernel_name = kernel_name
        self.label = label
        self._context = context
        self._on_death = on_death
        self._cwd = cwd
        self._ipc_dir = ipc_dir
        self._tmp_dir = tmp_dir  # the kernel's TMPDIR, removed with it (killed kernels leak)
        self._km: AsyncKernelManager | None = None
        self._wire: Wire | None = None
        self._shell: Any = None
        self._iopub: Any = None
        self._readers: list[asyncio.Task[None]] = []
        self._pending: tuple[str, ExecutionResult, asyncio.Future[ExecutionResult]] | None = None
        self._died = asyncio.get_running_loop().create_future()
        self._pidfd: int | None = None
        self._ready = False
        self.pid: int | None = None
        self.exit_code: int | None = None

    # ----- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the process and connect; returns once the kernel answers on both channels."""
        if self._ipc_dir:  # IPC sockets: no open TCP ports, and cheaper than loopback TCP
            self._km = AsyncKernelManager(
                kernel_name=self.kernel_name, context=self._context, transport="ipc",
                ip=os.path.join(self._ipc_dir, f"k{uuid.uuid4().hex[:12]}"))
        else:
            self._km = AsyncKernelManager(kernel_name=self.kernel_name, context=self._context)
        self._km.shutdown_wait_time = SHUTDOWN_GRACE
        extra: dict[str, Any] = {}
        if self._tmp_dir:
            os.makedirs(self._tmp_dir, mode=0o700, exist_ok=True)
            extra["env"] = {**os.environ, "TMPDIR": self._tmp_dir}
        try:
            await self._km.start_kernel(cwd=self._cwd, **extra)
        except Exception as exc:
            raise KernelError(f"cannot start kernel {self.kernel_name!r}: {exc}") from exc
        process = self._process()
        if process is None:
            raise KernelError("kgpool needs a local kernel process to supervise")
        self.pid = process.pid
        self._watch_process()
        session = self._km.session
        self._wire = Wire(session.key, session.session, session.username,
                          session.signature_scheme)
        self._shell = self._km.connect_shell()
        self._iopub = self._km.connect_iopub()
        self._readers = [asyncio.create_task(self._read_iopub(), name=f"{self.label}-iopub"),
                         asyncio.create_task(self._read_shell(), name=f"{self.label}-shell")]
        await self._wait_ready()
        self._ready = True

    def _watch_process(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.pid is not None
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # no pidfd: poll instead
            asyncio.create_task(self._poll_process(), name=f"{self.label}-poll")
            return
        loop.add_reader(self._pidfd, self._process_exited)

    def _process(self) -> Any:
        """The Popen of the kernel (jupyter_client's local provisioner keeps it)."""
        return getattr(self._km.provisioner, "process", None) if self._km else None

    async def _poll_process(self) -> None:
        while not self._died.done():
            await asyncio.sleep(0.1)
            process = self._process()
            if process is not None and process.poll() is not None:
                self._process_exited()

    def _process_exited(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._died.done():
            return
        process = self._process()
        self.exit_code = process.poll() if process is not None else None
        error = KernelDied(f"{self.label} (pid {self.pid}) died with exit code {self.exit_code}",
                           self.exit_code)
        self._died.set_result(error)
        if self._pending is not None and not self._pending[2].done():
            self._pending[2].set_exception(error)
        if self._on_death is not None:
            self._on_death(self)

    @property
    def died(self) -> asyncio.Future[KernelDied]:
        """Resolves (with the KernelDied error as its value) when the process exits."""
        return self._died

    @property
    def is_alive(self) -> bool:
        return self.pid is not None and not self._died.done()

    async def _wait_ready(self) -> None:
        """Kernel info on shell until iopub delivers too: SUB sockets miss early messages."""
        assert self._wire is not None
        for _ in range(600):
            msg_id, frames = self._wire.request("kernel_info_request", {})
            waiter = self._expect(msg_id)
            await self._shell.send_multipart(frames)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), 0.5)
                return
            except TimeoutError:
                if self._died.done():
                    raise self._died.result() from None
            finally:
                self._pending = None
        raise KernelError(f"{self.label} never answered on iopub")

    async def shutdown(self) -> None:
        """Ask politely, then kill the kernel's whole process group; never raises."""
        try:
            for task in self._readers:
                task.cancel()
            if self._ready and self._km is not None and self._km.has_kernel and self.is_alive:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._km.shutdown_kernel(now=False),
                                           SHUTDOWN_GRACE + 2)
        finally:
            self.kill()  # first thing in finally: even a cancelled shutdown leaves no process
            for sock in (self._shell, self._iopub):
                if sock is not None:
                    sock.close(linger=0)
            self._shell = self._iopub = None
            if self._km is not None:
                with contextlib.suppress(Exception):
                    await self._km.shutdown_kernel(now=True)
            if self._tmp_dir:
                shutil.rmtree(self._tmp_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the kernel's process group (the kernel and anything it spawned)."""
        process = self._process()  # also set when start() was cancelled half-way
        pid = self.pid or (process.pid if process is not None else None)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)

    # ----- execution --------------------------------------------------------------------

    async def execute(self, code: str, *, silent: bool = False) -> ExecutionResult:
        """Run code; the result arrives when the kernel goes idle. Raises KernelDied at once."""
        if self._died.done():
            raise self._died.result()
        if self._pending is not None:
            raise KernelError(f"{self.label} is already running code")
        assert self._wire is not None
        msg_id, frames = self._wire.request("execute_request", {
            "code": code, "silent": silent, "store_history": False,
            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True})
        waiter = self._expect(msg_id)
        await self._shell.send_multipart(frames, copy=False)
        try:
            return await waiter
        finally:
            self._pending = None

    def _expect(self, msg_id: str) -> asyncio.Future[ExecutionResult]:
        waiter: asyncio.Future[ExecutionResult] = asyncio.get_running_loop().create_future()
        self._pending = (msg_id, ExecutionResult(), waiter)
        return waiter

    async def _read_iopub(self) -> None:
        assert self._wire is not None
        wire, sock = self._wire, self._iopub
        while True:
            frames = await sock.recv_multipart(copy=True)
            pending = self._pending
            if pending is None:
                continue
            try:
                found = wire.reply_to(frames, pending[0].encode())
            except (ValueError, KeyError, TypeError):  # malformed: never stop the reader
                log.warning("%s: dropped an unreadable iopub message", self.label)
                continue
            if found is None:
                continue
            result = pending[1]
            result.feed(*found)
            if result.done and not pending[2].done():
                pending[2].set_result(result)

    async def _read_shell(self) -> None:
        # Replies are drained so they never pile up; iopub's idle status ends an execution.
        while True:
            await self._shell.recv_multipart(copy=False)
