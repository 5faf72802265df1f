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
from .offload import Offload
from .outputs import ExecutionResult
from .wire import Wire, encode_content, reply_of

log = logging.getLogger(__name__)

# ipykernel's default shutdown wait is 5 s; a kernel about to be replaced earns less patience.
SHUTDOWN_GRACE = 1.0
ABORT_GRACE = 0.3  # after the interrupt, before SIGKILL
# A kernel sends its execute_reply just before going idle; one that went idle without it sent
# none (its handler failed), and the execution ends with that error rather than a hang.
REPLY_GRACE = 1.0


async def abort_process(pid: int | None, stack_file: str | None,
                        died: asyncio.Future[Any], kill: Callable[[], None]) -> str | None:
    """Stop a hung kernel process (`pid`, None once it is gone): its threads' stacks first
    (SIGUSR2 writes them to `stack_file`), then SIGINT and ABORT_GRACE for the cell's
    `finally` blocks until `died`, then `kill()`. Returns the stacks, if any were written."""
    stacks = None
    if pid is not None:
        if stack_file:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGUSR2)
                stacks = await _settled_text(stack_file)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGINT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(died), ABORT_GRACE)
    kill()
    return stacks


async def _settled_text(path: str, polls: int = 50) -> str | None:
    """The file's text once it stops growing (a signal handler is writing it), or None."""
    size = -1
    for _ in range(polls):
        await asyncio.sleep(0.01)
        try:
            now = os.path.getsize(path)
        except OSError:
            return None
        if now and now == size:
            break
        size = now
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip() or None
    except OSError:
        return None


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
                 env: dict[str, str] | None = None, offload: Offload | None = None,
                 tmp_dir: str | None = None, runtime_dir: str | None = None) -> None:
        self.kernel_name = kernel_name
        self.label = label
        self._context = context
        self._on_death = on_death
        self._cwd = cwd
        self._ipc_dir = ipc_dir
        self._env = env
        self._offload = offload or Offload()
        self._key, self._scheme = b"", "hmac-sha256"
        self._tmp_dir = tmp_dir  # the kernel's TMPDIR, removed with it (killed kernels leak)
        self._runtime_dir = runtime_dir or ipc_dir  # for its connection file (it holds a key)
        self._km: AsyncKernelManager | None = None
        self._wire: Wire | None = None
        self._shell: Any = None
        self._iopub: Any = None
        self._readers: list[asyncio.Task[None]] = []
        self._pending: tuple[str, ExecutionResult, asyncio.Future[ExecutionResult]] | None = None
        self._no_reply: asyncio.TimerHandle | None = None
        self._died = asyncio.get_running_loop().create_future()
        self._pidfd: int | None = None
        self._ready = False
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.stack_file: str | None = None  # where a Python kernel dumps its stacks (abort)
        # kgpool's Python set-up runs in it (kgpool/_inkernel_io.py): REQUEST is bound from an
        # execute_request's metadata, and its tracebacks name notebook cells
        self.hooked = False
        self._watch: Callable[[str, dict[str, Any]], None] | None = None

    # ----- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the process and connect; returns once the kernel answers on both channels."""
        name = f"k{uuid.uuid4().hex[:12]}"
        if self._ipc_dir:  # IPC sockets: no open TCP ports, and cheaper than loopback TCP
            self._km = AsyncKernelManager(
                kernel_name=self.kernel_name, context=self._context, transport="ipc",
                ip=os.path.join(self._ipc_dir, name))
        else:
            self._km = AsyncKernelManager(kernel_name=self.kernel_name, context=self._context)
        if self._runtime_dir:  # its connection file holds the kernel's key: kgpool's 0700
            self._km.connection_file = os.path.join(self._runtime_dir, f"{name}.json")
        self._km.shutdown_wait_time = SHUTDOWN_GRACE
        extra: dict[str, Any] = {}
        if self._env is not None or self._tmp_dir:
            extra["env"] = dict(self._env if self._env is not None else os.environ)
        if self._tmp_dir:
            os.makedirs(self._tmp_dir, mode=0o700, exist_ok=True)
            extra["env"]["TMPDIR"] = self._tmp_dir
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
        self._key, self._scheme = session.key, session.signature_scheme
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
        """Started and not exited, asking the process itself: its exit may not have reached
        the event loop's watch yet."""
        if self.pid is None or self._died.done():
            return False
        process = self._process()
        return process is None or process.poll() is None

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
                self._forget()
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

    async def abort(self) -> str | None:
        """Stop a kernel that ran past its deadline and say where it was: its threads' stacks
        (Python kernels write them to `stack_file` on SIGUSR2), then an interrupt, so the cell's
        `finally` blocks get a moment, then SIGKILL."""
        return await abort_process(self.pid if self.is_alive else None, self.stack_file,
                                   self._died, self.kill)

    def interrupt(self) -> bool:
        """Interrupt the running cell now, as Jupyter's stop button does (SIGINT to the
        kernel's process group): False for kernels interrupted by message, whose interrupt
        could arrive after the cell ended, in the next one's time."""
        spec = self._km.kernel_spec if self._km is not None else None
        if self.pid is None or not self.is_alive or \
                getattr(spec, "interrupt_mode", "signal") != "signal":
            return False
        try:
            os.killpg(self.pid, signal.SIGINT)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, signal.SIGINT)
            except (ProcessLookupError, PermissionError):
                return False
        return True

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

    async def execute(self, code: str, *, silent: bool = False, limit: int = 0,
                      content: bytes | None = None, stream: bool = False,
                      watch: Callable[[str, dict[str, Any]], None] | None = None,
                      metadata: bytes | None = None) -> ExecutionResult:
        """Run code; the result arrives once the kernel has sent both its execute_reply and the
        idle status. Raises KernelDied at once. Output past `limit` characters is counted, not
        kept. A large request comes as its `content` already encoded (execute_content, in a
        helper process); `metadata`, encoded too, is kgpool's for the kernel's hooks
        (kgpool/_inkernel_io.py: the REQUEST to bind, whether to stream)."""
        if self._died.done():
            raise self._died.result()
        if self._pending is not None:
            raise KernelError(f"{self.label} is already running code")
        assert self._wire is not None
        # kgpool's own metadata: the stdout capture (_inkernel_io) sends at once what a streamed
        # cell prints; `watch` then sees each message as it arrives
        if metadata is None:
            metadata = b'{"kgpool_stream": true}' if stream else b"{}"
        if content is None:
            content = execute_content(code, silent)
        if len(content) + len(metadata) > 1 << 20:  # signed beside the event loop
            msg_id, frames = await self._wire.request_large("execute_request", content,
                                                            metadata)
        else:
            msg_id, frames = self._wire.request_encoded("execute_request", content, metadata)
        waiter = self._expect(msg_id, limit)
        self._watch = watch
        await self._shell.send_multipart(frames, copy=False)
        try:
            return await waiter
        finally:
            self._forget()

    def _expect(self, msg_id: str, limit: int = 0) -> asyncio.Future[ExecutionResult]:
        waiter: asyncio.Future[ExecutionResult] = asyncio.get_running_loop().create_future()
        self._pending = (msg_id, ExecutionResult(limit=limit), waiter)
        return waiter

    def _forget(self) -> None:
        self._pending = None
        self._watch = None
        if self._no_reply is not None:
            self._no_reply.cancel()
            self._no_reply = None

    def _progress(self, pending: tuple[str, ExecutionResult,
                                       asyncio.Future[ExecutionResult]]) -> None:
        """Resolve the waiter when done; give a missing execute_reply REPLY_GRACE after idle."""
        result, waiter = pending[1], pending[2]
        if waiter.done():
            return
        if result.done:
            waiter.set_result(result)
        elif result.idle and self._no_reply is None:
            def no_reply() -> None:
                if self._pending is pending and not result.replied:
                    log.warning("%s went idle without an execute_reply", self.label)
                    result.reply(None)
                    self._progress(pending)
            self._no_reply = asyncio.get_running_loop().call_later(REPLY_GRACE, no_reply)

    async def _read_iopub(self) -> None:
        assert self._wire is not None
        wire, sock = self._wire, self._iopub
        while True:
            frames = await sock.recv_multipart(copy=True)
            pending = self._pending
            if pending is None:
                continue
            size = sum(map(len, frames))
            try:
                if size < self._offload.threshold:
                    found = wire.reply_to(frames, pending[0].encode())
                else:  # a large output: checked and parsed off the event loop
                    found = await self._offload.run(size, reply_of, self._key, self._scheme,
                                                    frames, pending[0].encode())
            except (ValueError, KeyError, TypeError):  # malformed: never stop the reader
                log.warning("%s: dropped an unreadable iopub message", self.label)
                continue
            if found is None or pending is not self._pending:
                continue
            pending[1].feed(*found)
            if self._watch is not None:
                self._watch(*found)
            self._progress(pending)

    async def _read_shell(self) -> None:
        # Every reply is read so none piles up; the one to the pending request is folded in.
        assert self._wire is not None
        wire, sock = self._wire, self._shell
        while True:
            frames = await sock.recv_multipart(copy=True)
            pending = self._pending
            if pending is None:
                continue
            try:
                found = wire.reply_to(frames, pending[0].encode())
            except (ValueError, KeyError, TypeError):
                log.warning("%s: dropped an unreadable shell reply", self.label)
                continue
            if found is not None and found[0].endswith("_reply"):
                pending[1].reply(found[1])
                self._progress(pending)


def execute_content(code: str, silent: bool = False,
                    expressions: dict[str, str] | None = None) -> bytes:
    """An execute_request's content, encoded (a plain function: a helper process runs it for
    large code); `expressions` are evaluated after the code, their values in the reply."""
    return encode_content({"code": code, "silent": silent, "store_history": False,
                           "user_expressions": expressions or {}, "allow_stdin": False,
                           "stop_on_error": True})
