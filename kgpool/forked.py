"""Fork mode (--fork): per notebook version, one template kernel that ran kgpool's set-up and the
init cells and never serves, and the workers forked from it on request.

A worker is another implementation of the kernel interface the pool uses (pid, is_alive,
exit_code, label, kill, shutdown, abort, and a death callback), so the pool does not know which
mode it runs. Workers share the template's memory copy-on-write: N of them cost about one copy
of the init cells' state, and a new one serves milliseconds after it is asked for. The kernel
side is kgpool/_inkernel_fork.py. kgpool watches each worker with a pidfd (it works on processes
that are not its children); the template reaps them and reports their exit statuses. When the
template dies its workers die with it (PR_SET_PDEATHSIG) and the next worker of that version
warms a new template the full way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import select
import signal
import struct
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from .direct import DirectChannel, install_code
from .errors import InitError, KernelDied, KernelError
from .kernel import ABORT_GRACE, SHUTDOWN_GRACE, Kernel, _settled_text
from .languages import bind_request
from .lease import describe_exit
from .offload import Offload
from .outputs import ExecutionResult

log = logging.getLogger(__name__)

_SOURCE = resources.files(__package__).joinpath("_inkernel_fork.py").read_text(encoding="utf-8")
_HEADER = struct.Struct(">I")
STATUS_WAIT = 1.0  # seconds a worker's death waits for its exit status from the template
TEMPLATE_DIED = "template died"  # the exit status of the workers a template's death killed

Cells = list[tuple[str, str | None]]  # endpoint cells and their ResponseInfo cells
# (version, on_death) -> a kernel of that version warmed for a template (set-up + init cells)
TemplateWarmer = Callable[[int, Callable[[Kernel], None]], Awaitable[Kernel]]


class ExitListener(Protocol):
    def kernel_exited(self, status: str) -> None: ...


def template_setup() -> str:
    """Run in a template after kgpool's set-up, before the init cells: it notes what the
    kernel and kgpool have open and running, to tell apart what the init cells open."""
    return ("(lambda ns: (exec(" + repr(_SOURCE) + ", ns), ns['_kgpool_fork_setup'](), "
            "setattr(get_ipython(), 'kgpool_fork', ns)))({'get_ipython': get_ipython})\n")


def _install_code(path: str, cells: Cells, allow_threads: bool) -> str:
    return ("print(__import__('json').dumps(get_ipython().kgpool_fork['_kgpool_fork_install']("
            f"{path!r}, {cells!r}, {allow_threads!r})), end='')\n")


def _frame(data: dict[str, Any]) -> bytes:
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


def check(report: Report, label: str, allow_threads: bool) -> None:
    """Refuse what would half-work, warn about what may: InitError says why."""
    if report.cuda:
        raise InitError(
            f"--fork refused: {report.cuda} in the template after the init cells; a forked "
            "process cannot use CUDA its parent initialised. Initialise CUDA in the endpoint "
            "cells instead, or serve without --fork")
    if report.threads:
        names = ", ".join(report.threads)
        if not allow_threads:
            raise InitError(
                f"--fork refused: the init cells left {len(report.threads)} Python thread(s) "
                f"running: {names}. A forked worker has none of them, and a lock one of them "
                "held at the fork stays locked in the worker for ever. Stop them at the end of "
                "the init cells, or pass --fork-allow-threads if the workers never need them")
        log.warning("%s: the init cells left Python threads running (--fork-allow-threads): "
                    "%s; the workers do not have them", label, names)
    if report.descriptors:
        log.warning(
            "%s: the init cells opened descriptors that every forked worker shares with the "
            "template: %s. A connection (database, socket, pipe) used by several processes "
            "mixes their traffic, and a file shares its offset: open it again in each worker, "
            "e.g. with os.register_at_fork(after_in_child=...) in the init cells",
            label, ", ".join(report.descriptors))


class Worker:
    """A process forked from a template that serves the direct channel's protocol."""

    def __init__(self, template: Template, pid: int, label: str, stacks: str,
                 on_death: Callable[[Any], None]) -> None:
        self.template, self.pid, self.label = template, pid, label
        self.stack_file: str | None = stacks
        self.exit_code: int | None = None
        self.exit_status: str | None = None  # set when only the cause is known
        self.channel: DirectChannel | None = None
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
        connect = asyncio.ensure_future(asyncio.open_unix_connection(path))
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
        reader, writer = connect.result()
        self.channel = DirectChannel(self, reader, writer, {}, offload)  # type: ignore[arg-type]

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
        stacks = None
        if self.is_alive:
            if self.stack_file:
                with contextlib.suppress(OSError):
                    os.kill(self.pid, signal.SIGUSR2)
                    stacks = await _settled_text(self.stack_file)
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGINT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._died), ABORT_GRACE)
        self.kill()
        return stacks

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
        self._writer.write(_frame({"id": number,
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


class Forker:
    """The templates of one notebook (one per version being served) and the pool's factory of
    workers: `worker(version, slot, on_death)` is a KernelFactory."""

    def __init__(self, warm: TemplateWarmer, cells: Callable[[int], Cells], *, ipc_dir: str,
                 current: Callable[[], int], listener: ExitListener, offload: Offload,
                 allow_threads: bool = False, timeout: float = 120.0, name: str = "") -> None:
        self._warm, self._cells, self._dir, self._current = warm, cells, ipc_dir, current
        self._listener, self._offload = listener, offload
        self._allow_threads, self._timeout, self._name = allow_threads, timeout, name
        self._templates: dict[int, Template] = {}
        self._warming: dict[int, asyncio.Task[Template]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def templates(self) -> list[Template]:
        return [t for t in self._templates.values() if t.alive]

    async def worker(self, version: int, slot: int, on_death: Callable[[Any], None]) -> Worker:
        """A worker of `version` for `slot`, forked from its template (warmed first if none
        is alive); InitError if it cannot be had."""
        if self._closed:
            raise InitError("kgpool is shutting down")
        for attempt in (1, 2):  # a template that died just now: warm another, once
            template = await self._template(version)
            try:
                return await self._fork(template, slot, on_death)
            except KernelDied as exc:
                if attempt == 2 or template.alive:
                    raise InitError(f"slot {slot}: {exc}") from None
        raise AssertionError("unreachable")

    async def _fork(self, template: Template, slot: int,
                    on_death: Callable[[Any], None]) -> Worker:
        name = uuid.uuid4().hex[:12]
        path = os.path.join(self._dir, f"w{name}.sock")
        stacks = os.path.join(self._dir, f"stacks-w{name}")
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(self._timeout):
            pid = await template.fork(path, stacks)
            worker = Worker(template, pid, f"slot {slot}", stacks, on_death)
            template.workers.add(worker)
            try:
                await worker.connect(path, self._offload)
            except BaseException:
                await worker.shutdown()
                raise
        log.info("slot %d forked from the template (pid %s) in %.0f ms: pid %d", slot,
                 template.kernel.pid, 1000 * (loop.time() - started), pid)
        return worker

    async def _template(self, version: int) -> Template:
        template = self._templates.get(version)
        if template is not None and template.alive:
            return template
        task = self._warming.get(version)
        if task is None:
            task = self._warming[version] = asyncio.ensure_future(self._make(version))
            task.add_done_callback(lambda done: self._warmed(version, done))
        return await asyncio.shield(task)

    def _warmed(self, version: int, task: asyncio.Task[Template]) -> None:
        if self._warming.get(version) is task:
            del self._warming[version]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter got it

    async def _make(self, version: int) -> Template:
        """Warm a template the full way (set-up, init cells), then check and install."""
        holder: list[Template] = []
        kernel = await self._warm(version, lambda k: self._died(k, holder))
        label = f"{self._name or 'notebook'} v{version} template (pid {kernel.pid})"
        try:
            async with asyncio.timeout(self._timeout):
                template = await self._install(kernel, version, label)
        except BaseException as exc:
            await kernel.shutdown()
            if isinstance(exc, TimeoutError):
                raise InitError(f"{label}: no answer while installing the fork server") \
                    from None
            if isinstance(exc, KernelError):
                raise InitError(f"{label}: {exc}") from None
            raise
        holder.append(template)
        old = self._templates.get(version)
        self._templates[version] = template
        if old is not None:
            self._stop(old)
        log.info("%s ready: it forks workers from now on", label)
        self.prune()
        return template

    async def _install(self, kernel: Kernel, version: int, label: str) -> Template:
        cells = self._cells(version)
        compiled = await kernel.execute(install_code("", cells))
        if compiled.error is not None:
            raise KernelError(f"cannot compile the endpoints: {compiled.error.get('ename')}: "
                              f"{compiled.error.get('evalue')}")
        for index, reason in json.loads(compiled.text).items():
            log.info("%s: endpoint %d runs through the shell's run_cell: %s", label,
                     int(index) + 1, reason)
        path = os.path.join(self._dir, f"t{uuid.uuid4().hex[:12]}.sock")
        bound = [(bind_request("python", "") + source, info) for source, info in cells]
        result = await kernel.execute(_install_code(path, bound, self._allow_threads))
        if result.error is not None:
            raise KernelError(f"fork install failed: {result.error.get('ename')}: "
                              f"{result.error.get('evalue')}")
        report = Report(**json.loads(result.text))
        check(report, label, self._allow_threads)
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return Template(kernel, version, report, reader, writer, self.prune)

    def _died(self, kernel: Kernel, holder: list[Template]) -> None:
        if not holder or holder[0].stopped:
            return  # during its warm-up (the warm-up fails) or shut down by us
        template = holder[0]
        status = describe_exit(kernel.exit_code)
        log.error("the %s v%d template (pid %s) exited unexpectedly: %s; its %d worker(s) die "
                  "with it, and the next ones warm a new template the full way",
                  self._name or "notebook", template.version, kernel.pid, status,
                  len(template.workers))
        self._listener.kernel_exited(status)
        template.gone()
        if self._templates.get(template.version) is template:
            del self._templates[template.version]

    def prune(self) -> None:
        """Shut down the templates no worker needs: not the current version, no workers."""
        current = self._current()
        for version, template in list(self._templates.items()):
            if version != current and not template.busy:
                del self._templates[version]
                self._stop(template)

    def _stop(self, template: Template) -> None:
        log.info("%s v%d template (pid %s) shut down: no worker needs it", self._name or
                 "notebook", template.version, template.kernel.pid)
        task = asyncio.ensure_future(template.shutdown())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._warming.values()):
            task.cancel()
        await asyncio.gather(*self._warming.values(), return_exceptions=True)
        for template in list(self._templates.values()):
            self._stop(template)
        self._templates.clear()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
