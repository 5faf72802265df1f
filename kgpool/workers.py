"""The processes of fork mode, seen from kgpool: a template kernel's control socket (the kgpool
side of _inkernel_fork.py's protocol: fork requests, exit statuses) and the workers forked
through it.

A Worker implements the kernel interface the pool uses (pid, is_alive, exit_code, label, kill,
shutdown, abort; its death is reported through a callback), so the pool does not know which mode
it runs. kgpool watches a worker with a pidfd (it works on processes that are not its children);
its exit status comes from the template, which reaps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import select
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .direct import DirectChannel
from .errors import KernelDied, KernelError
from .kernel import SHUTDOWN_GRACE, Kernel, abort_process
from .lease import describe_exit
from .offload import Offload
from .outputs import ExecutionResult

_HEADER = struct.Struct(">I")
STATUS_WAIT = 1.0  # seconds a worker's death waits for its exit status from the template
TEMPLATE_DIED = "template died"  # the exit status of the workers a template's death killed


def frame(data: dict[str, Any]) -> bytes:
    payload = json.dumps(data).encode("utf-8")
    return _HEADER.pack(len(payload)) + payload


@dataclass(frozen=True)
class Report:
    """What a template found after its init cells."""

    threads: list[str]  # Python threads the init cells left running
    cuda: str | None  # why CUDA looks initialised
    descriptors: list[str]  # descriptors the init cells opened: shared with every worker
    state: int  # bytes of resident memory the init cells added
    installed: bool  # False: refused, nothing serves


class Worker:
    """A process forked from a template that serves the direct channel's protocol."""

    def __init__(self, template: Template, pid: int, label: str, stacks: str,
                 on_death: Callable[[Any], None]) -> None:
        self.template, self.pid, self.label = template, pid, label
        self.stack_file: str | None = stacks
        self.exit_code: int | None = None
        self.exit_status: str | None = None  # set when only the cause is known
        self.channel: DirectChannel | None = None
        self.hooked = True  # kgpool's Python set-up ran in its template (kgpool/kernel.py)
        self._on_death = on_death
        loop = asyncio.get_running_loop()
        self._died: asyncio.Future[KernelDied] = loop.create_future()
        self._pidfd: int | None = None
        self._ending: asyncio.Task[None] | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # gone already (and reaped)
            self._exited()
            return
        loop.add_reader(self._pidfd, self._exited)

    @property
    def died(self) -> asyncio.Future[KernelDied]:
        return self._died

    @property
    def is_alive(self) -> bool:
        if self._died.done() or self._pidfd is None:
            return False
        poll = select.poll()  # a pidfd turns readable when its process exits
        poll.register(self._pidfd, select.POLLIN)
        return not poll.poll(0)

    async def connect(self, path: str, offload: Offload) -> None:
        connect = asyncio.ensure_future(DirectChannel.connect(
            self, path, {}, offload))  # type: ignore[arg-type]
        waits: list[asyncio.Future[Any]] = [connect, self._died]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not connect.done():
                connect.cancel()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # the listening socket lives on in the worker
        if self._died.done() and not connect.done():
            raise self._died.result()
        self.channel = connect.result()

    def _exited(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._ending is None:
            self._ending = asyncio.ensure_future(self._ended())

    async def _ended(self) -> None:
        """The process is gone: learn its exit status from the template, then tell."""
        self.exit_code, known = await self.template.exit_status(self.pid)
        if not known and not self.template.alive:
            self.exit_status = TEMPLATE_DIED
        error = KernelDied(f"{self.label} (pid {self.pid}) died with "
                           f"{self.exit_status or describe_exit(self.exit_code)}",
                           self.exit_code)
        self._died.set_result(error)
        self._on_death(self)

    def interrupt(self) -> bool:
        """SIGINT to the worker's process group, as Kernel.interrupt: the running cell gets a
        KeyboardInterrupt."""
        try:
            os.killpg(self.pid, signal.SIGINT)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the worker's process group (it is a session of its own)."""
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    async def shutdown(self) -> None:
        """Close its channel (it exits when it reads the end), then SIGKILL; never raises."""
        try:
            if self.channel is not None:
                self.channel.close()
            if not self._died.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._died), SHUTDOWN_GRACE)
        finally:
            self.kill()
            if self.stack_file is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.stack_file)
            self.template.forget(self)

    async def abort(self) -> str | None:
        """Past its deadline: its threads' stacks (SIGUSR2), an interrupt, then SIGKILL."""
        return await abort_process(self.pid if self.is_alive else None, self.stack_file,
                                   self._died, self.kill)

    async def execute(self, code: str, **_: Any) -> ExecutionResult:
        raise KernelError(f"{self.label} is a forked worker: it has no Jupyter channel")


class Template:
    """A template kernel and the control socket it forks workers through."""

    def __init__(self, kernel: Kernel, version: int, report: Report,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_idle: Callable[[], None]) -> None:
        self.kernel, self.version, self.report = kernel, version, report
        self._on_idle = on_idle  # called when its last worker is gone
        self.workers: set[Worker] = set()
        self.stopped = False
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._exits: dict[int, int | None] = {}
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._gone = asyncio.get_running_loop().create_future()
        self._reader = asyncio.ensure_future(self._read(reader))

    @property
    def alive(self) -> bool:
        return not self._gone.done() and self.kernel.is_alive

    @property
    def busy(self) -> bool:
        return bool(self.workers or self._pending)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                size = _HEADER.unpack(await reader.readexactly(_HEADER.size))[0]
                message = json.loads(await reader.readexactly(size))
                if "exit" in message:
                    pid = message["exit"]
                    self._exits[pid] = message["status"]
                    waiter = self._waiting.pop(pid, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                elif message.get("id") in self._pending:
                    future = self._pending.pop(message["id"])
                    if not future.done():
                        future.set_result(message)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, KeyError):
            pass  # the template died (or was shut down)
        finally:
            self.gone()

    def gone(self) -> None:
        """Its control socket closed: no fork will be answered, no exit status reported."""
        if not self._gone.done():
            self._gone.set_result(None)
        futures: list[asyncio.Future[Any]] = [*self._pending.values(), *self._waiting.values()]
        for future in futures:
            if not future.done():
                future.set_exception(KernelDied(f"the template (pid {self.kernel.pid}) died"))
        self._pending.clear()
        self._waiting.clear()

    async def exit_status(self, pid: int) -> tuple[int | None, bool]:
        """(exit code, whether the template reported it) of a worker that exited."""
        if pid not in self._exits and not self._gone.done():
            waiter = self._waiting.setdefault(pid, asyncio.get_running_loop().create_future())
            with contextlib.suppress(TimeoutError, KernelDied):
                await asyncio.wait_for(asyncio.shield(waiter), STATUS_WAIT)
        if pid in self._exits:
            return self._exits.pop(pid), True
        return None, False

    async def fork(self, socket_path: str, stacks: str) -> int:
        """Ask the template for a worker listening on `socket_path`: its pid."""
        if not self.alive:
            raise KernelDied(f"the template (pid {self.kernel.pid}) died")
        number = next(self._ids)
        future = self._pending[number] = asyncio.get_running_loop().create_future()
        self._writer.write(frame({"id": number,
                                   "fork": {"socket": socket_path, "stacks": stacks}}))
        try:
            reply = await future
        finally:
            self._pending.pop(number, None)
        if "error" in reply:
            raise KernelError(f"the template could not fork: {reply['error']}")
        return int(reply["pid"])

    def forget(self, worker: Worker) -> None:
        if worker in self.workers:
            self.workers.discard(worker)
            if not self.workers:
                self._on_idle()

    async def shutdown(self) -> None:
        self.stopped = True
        self._writer.close()
        await self.kernel.shutdown()
        self._reader.cancel()
        self.gone()
