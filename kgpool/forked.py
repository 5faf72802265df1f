"""Fork mode (--fork): per notebook version, one template kernel that ran kgpool's set-up and the
init cells and never serves, and the workers forked from it on request (kgpool/workers.py).

Workers share the template's memory copy-on-write: N of them cost about one copy of the init
cells' state, and a new one serves milliseconds after it is asked for. The kernel side is
kgpool/_inkernel_fork.py. A template is warmed the full way when the first worker of its version
is asked for; when it dies its workers die with it (PR_SET_PDEATHSIG), and the next worker asked
for warms a new one; once no worker needs it (a reload moved on), it is shut down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol

from .direct import install_code
from .errors import InitError, KernelDied, KernelError
from .kernel import Kernel
from .lease import describe_exit
from .offload import Offload
from .workers import Report, Template, Worker

log = logging.getLogger(__name__)

_SOURCE = resources.files(__package__).joinpath("_inkernel_fork.py").read_text(encoding="utf-8")

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
            except TimeoutError:
                raise InitError(f"slot {slot}: no worker from the template after "
                                f"{self._timeout:g}s") from None
            except KernelError as exc:
                raise InitError(f"slot {slot}: {exc}") from None
        raise AssertionError("unreachable")

    async def _fork(self, template: Template, slot: int,
                    on_death: Callable[[Any], None]) -> Worker:
        name = uuid.uuid4().hex[:12]
        path = os.path.join(self._dir, f"w{name}")  # short: sun_path
        stacks = os.path.join(self._dir, f"stacks-w{name}")
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(self._timeout):
            try:
                pid = await template.fork(path, stacks)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # bound by the template before a fork that failed
                raise
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
        path = os.path.join(self._dir, f"t{uuid.uuid4().hex[:12]}")
        # the cells as they are: each call binds REQUEST as data (kgpool/_inkernel.py)
        result = await kernel.execute(_install_code(path, cells, self._allow_threads))
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
