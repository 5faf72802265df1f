"""NotebookService: a notebook (every version being served) and its pool, no HTTP; one deadline
per request covers all phases."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import tempfile
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import zmq.asyncio

from .config import Settings
from .direct import DirectChannel, python_setup
from .errors import (
    ConfigError,
    EndpointRemoved,
    ExecutionError,
    ExecutionTimeout,
    InitError,
    KernelDied,
    KernelError,
    ResponseInfoError,
    ResponseTooLarge,
)
from .forked import Forker, template_setup
from .kernel import Kernel, execute_content
from .languages import bind_request, bind_request_from_file
from .memory import MemoryWatch, TemplateInfo
from .metrics import NotebookMetrics
from .notebook import Endpoint, Notebook
from .offload import Offload
from .outputs import ExecutionResult
from .pool import Accepts, KernelPool, Lease, PoolStatus
from .replies import Reply, build_reply
from .requests import RequestData, request_document
from .routes import Router

log = logging.getLogger(__name__)

# Run in every Python kernel before the init cells: a cell whose value is bytes gets an
# application/octet-stream representation, so it can answer with those bytes; SIGUSR2 dumps
# every thread's stack to a file, so a kernel stopped past its deadline says where it hung.
PYTHON_SETUP = """
def _kgpool_setup(stacks):
    import faulthandler, signal
    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName, Unicode
    class BytesFormatter(BaseFormatter):
        format_type = Unicode("application/octet-stream")
        print_method = ObjectName("_repr_octet_stream_")
        _return_type = (bytes,)
    display = get_ipython().display_formatter
    formatter = BytesFormatter(parent=display)
    formatter.for_type(bytes, bytes)
    formatter.for_type(bytearray, bytes)
    display.formatters[formatter.format_type] = formatter
    faulthandler.register(signal.SIGUSR2, file=open(stacks, "w"), all_threads=True, chain=False)
_kgpool_setup(%r)
del _kgpool_setup
"""


def setup_code(stacks: str) -> str:
    """What every Python kernel runs before its init cells (stacks: where SIGUSR2 dumps)."""
    return PYTHON_SETUP % stacks + python_setup()


Key = tuple[str, str]  # (method, path template): an endpoint in any version of the notebook
LARGE = 64 * 1024  # characters of REQUEST past which a kernel reads it from a file


@dataclass
class CallInfo:
    """Filled in as a request goes through the service; the access log reads it."""

    queue_wait: float = 0.0
    slot: int | None = None
    kernel_pid: int | None = None


@dataclass(frozen=True)
class Version:
    """One version of the notebook, as loaded; kernels are warmed with one version each."""

    number: int
    notebook: Notebook
    router: Router
    endpoints: dict[Key, tuple[int, Endpoint]] = field(default_factory=dict)  # index, endpoint

    @classmethod
    def of(cls, number: int, notebook: Notebook) -> Version:
        return cls(number, notebook, Router(notebook.endpoints),
                   {(ep.method, ep.path): (i, ep) for i, ep in enumerate(notebook.endpoints)})


class NotebookService:
    def __init__(self, notebook: Notebook, settings: Settings, metrics: NotebookMetrics, *,
                 path: Path | None = None, kernels: int | None = None,
                 max_kernels: int | None = None, warmups: asyncio.Semaphore | None = None,
                 offload: Offload | None = None) -> None:
        self.settings = settings
        self._offload = offload or Offload()
        self.metrics = metrics
        self._cwd = str(path.resolve().parent) if path is not None else None
        # Kernel Gateway's notebooks tell "served" from "run by hand" by KERNEL_GATEWAY=1.
        self._env = {**settings.kernel_env, "KERNEL_GATEWAY": "1"}
        self.current = Version.of(1, notebook)
        self._versions: dict[int, Version] = {1: self.current}
        self._forker: Forker | None = None  # --fork: made with the runtime folder
        if settings.fork:
            _forkable(notebook)
        self.pool = KernelPool(self._make_worker if settings.fork else self._make_kernel,
                               kernels or settings.kernels,
                               max_queue=settings.max_queue,
                               max_requests=settings.max_requests,
                               max_requests_jitter=settings.max_requests_jitter,
                               ready_size=settings.ready_kernels, version=1, warmups=warmups,
                               max_size=max_kernels or settings.max_kernels,
                               grow_delay=settings.scale_up_delay,
                               idle_timeout=settings.idle_timeout, listener=metrics)
        self._direct: weakref.WeakKeyDictionary[Kernel, DirectChannel] = \
            weakref.WeakKeyDictionary()
        self._context: zmq.asyncio.Context | None = None
        self._ipc_dir: str | None = None
        self._warm: asyncio.Task[None] | None = None
        self._memory: asyncio.Task[None] | None = None
        self._runs: set[asyncio.Task[Reply]] = set()

    @property
    def notebook(self) -> Notebook:
        return self.current.notebook

    def kernel_name(self, notebook: Notebook) -> str:
        return self.settings.kernel_name or notebook.kernel_name or "python3"

    # ----- life cycle ----------------------------------------------------------------------

    def begin(self) -> None:
        """Allocate the runtime folder and start warming the pool in the background;
        `warmed()` reports the outcome, `close()` frees everything, also after a failure."""
        try:
            self._ipc_dir = tempfile.mkdtemp(prefix="kgpool-")
        except OSError as exc:  # no usable folder at all, or ENOSPC from the chosen one
            full = exc.errno in (errno.ENOSPC, errno.ENOENT, errno.EDQUOT)
            raise ConfigError(
                "cannot create kgpool's runtime folder for kernel sockets: "
                + ("the disk is full (or TMPDIR is not writable)" if full else str(exc))
            ) from None
        self._context = zmq.asyncio.Context()
        if self.settings.fork:
            self._forker = Forker(self._warm_template, self._cells, ipc_dir=self._ipc_dir,
                                  current=lambda: self.pool.version, listener=self.metrics,
                                  offload=self._offload, name=self.metrics.name,
                                  allow_threads=self.settings.fork_allow_threads,
                                  timeout=self.settings.init_timeout)
        self._warm = asyncio.create_task(self.pool.start(), name="kgpool-warm-up")
        watch = MemoryWatch(self.pool, limit=self.settings.kernel_memory_limit,
                            report=self.metrics.kernel_memory, templates=self._templates,
                            name=self.metrics.name)
        self._memory = asyncio.create_task(self._watch_memory(watch), name="kgpool-memory")

    async def _watch_memory(self, watch: MemoryWatch) -> None:
        assert self._warm is not None
        await asyncio.wait([self._warm])  # a first sample as soon as the pool is warm
        await watch.run(first=True)

    async def warmed(self) -> None:
        assert self._warm is not None, "begin() first"
        await asyncio.shield(self._warm)

    @property
    def ready(self) -> bool:
        return self.pool.ready

    def status(self) -> PoolStatus:
        return self.pool.status()

    async def drain(self, timeout: float) -> bool:
        return await self.pool.drain(timeout)

    async def close(self) -> None:
        if self._memory is not None:
            self._memory.cancel()
        if self._warm is not None and not self._warm.done():
            self._warm.cancel()
        if self._warm is not None:
            await asyncio.gather(self._warm, return_exceptions=True)
        await self.pool.close()
        if self._forker is not None:
            await self._forker.close()
        await asyncio.gather(*self._runs, return_exceptions=True)
        for channel in list(self._direct.values()):
            channel.close()
        if self._context is not None:
            self._context.destroy(linger=0)
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)

    async def reload(self, notebook: Notebook) -> None:
        """Roll the pool over to a new version of the notebook, one kernel at a time; raises
        (the old version keeps serving) if the first kernel of the new one cannot warm."""
        if self.settings.fork:
            _forkable(notebook)
        version = Version.of(max(self._versions) + 1, notebook)
        self._versions[version.number] = version
        try:
            await self.pool.roll(version.number, on_first=lambda: self._switch(version))
        except BaseException:
            if self.current is not version:
                del self._versions[version.number]
            raise
        finally:
            live = {lease.version for lease in self.pool.members()} | {self.current.number}
            for number in [n for n in self._versions if n not in live]:
                del self._versions[number]
            if self._forker is not None:
                self._forker.prune()  # the template of a version that did not warm

    def _switch(self, version: Version) -> None:
        log.info("%s: the new version serves from now on; retiring the old kernels one by one",
                 version.notebook.name)
        self.current = version

    async def _make_kernel(self, number: Any, slot: int, on_death: Any, *,
                           template: bool = False) -> Kernel:
        """A kernel warmed the full way; a --fork template's set-up also notes what the init
        cells will open, and it gets no channel of its own (forked.py installs its own)."""
        assert self._context is not None and self._ipc_dir is not None, "begin() first"
        version = self._versions[number]
        kernel = Kernel(self.kernel_name(version.notebook), context=self._context,
                        label="template" if template else f"slot {slot}", on_death=on_death,
                        cwd=self._cwd,
                        ipc_dir=self._ipc_dir, env=self._env, offload=self._offload)
        cell = None
        try:
            async with asyncio.timeout(self.settings.init_timeout):
                started = time.monotonic()
                await kernel.start()
                if version.notebook.language == "python":
                    stacks = os.path.join(self._ipc_dir, f"stacks-{uuid.uuid4().hex[:12]}")
                    setup = await kernel.execute(
                        setup_code(stacks) + (template_setup() if template else ""),
                        silent=True)
                    if setup.error is not None:
                        log.warning("%s: Python setup failed, stdout is not captured: %s: %s",
                                    kernel.label, setup.error.get("ename"),
                                    setup.error.get("evalue"))
                    kernel.stack_file = stacks
                booted = time.monotonic()
                for cell in version.notebook.init_cells:
                    result = await kernel.execute(cell.source)
                    if result.error is not None:
                        raise InitError(
                            f"init {cell.name} raised "
                            f"{result.error.get('ename')}: {result.error.get('evalue')}")
                self.metrics.kernel_warmed(booted - started, time.monotonic() - booted)
                cell = None
                if not template:
                    await self._open_direct(kernel, version)
        except BaseException as exc:
            await kernel.shutdown()
            where = f" in init {cell.name}" if cell else ""
            if isinstance(exc, TimeoutError):
                raise InitError(
                    f"kernel not warm after {self.settings.init_timeout:g}s{where}") from None
            if isinstance(exc, KernelDied):
                raise InitError(f"kernel died{where} (exit code {exc.exit_code})") from None
            if isinstance(exc, KernelError):
                raise InitError(str(exc)) from None
            raise
        return kernel

    async def _warm_template(self, number: int, on_death: Any) -> Kernel:
        return await self._make_kernel(number, -1, on_death, template=True)

    def _cells(self, number: int) -> list[tuple[str, str | None]]:
        endpoints = self._versions[number].notebook.endpoints
        return [(ep.source, ep.response_source) for ep in endpoints]

    def _templates(self) -> list[TemplateInfo]:
        if self._forker is None:
            return []
        return [TemplateInfo(t.version, t.kernel.pid, t.report.state)
                for t in self._forker.templates() if t.kernel.pid is not None]

    async def _make_worker(self, number: Any, slot: int, on_death: Any) -> Kernel:
        """--fork: a worker forked from the version's template, its channel registered."""
        assert self._forker is not None, "begin() first"
        worker = await self._forker.worker(number, slot, on_death)
        assert worker.channel is not None
        self._direct[cast(Kernel, worker)] = worker.channel
        return cast(Kernel, worker)  # the pool uses only the kernel interface it implements

    async def _open_direct(self, kernel: Kernel, version: Version) -> None:
        if self.settings.channel != "direct" or version.notebook.language != "python":
            return
        assert self._ipc_dir is not None
        path = os.path.join(self._ipc_dir, f"d{uuid.uuid4().hex[:12]}.sock")
        cells = [(ep.source, ep.response_source) for ep in version.notebook.endpoints]
        try:
            channel = await DirectChannel.open(kernel, path, cells, self._offload)
        except (KernelError, OSError, ValueError) as exc:
            log.warning("%s: direct channel unavailable, using the Jupyter channel: %s",
                        kernel.label, exc)
            return
        for index, reason in channel.refused.items():
            ep = version.notebook.endpoints[index]
            log.info("%s %s runs on the Jupyter channel: %s", ep.method, ep.path, reason)
        self._direct[kernel] = channel

    # ----- requests ------------------------------------------------------------------------

    def _accepts(self, key: Key) -> Accepts | None:
        """Which versions' kernels can run `key`: all of them (None), unless a reload changed
        it; EndpointRemoved if none can (a reload removed it while the request was read)."""
        having = {n for n, version in self._versions.items() if key in version.endpoints}
        if not having:
            raise EndpointRemoved("a reload removed this endpoint")
        return None if len(having) == len(self._versions) else having.__contains__

    async def call(self, endpoint: Endpoint, request: RequestData,
                   info: CallInfo | None = None) -> Reply:
        """Run an endpoint for one request within the request's deadline."""
        info = info or CallInfo()
        timeout = self.settings.request_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        # before a kernel is leased (it may fail), and off the event loop if it is large
        document = await self._offload.run(len(request.body), request_document, request)
        key = (endpoint.method, endpoint.path)
        queued = loop.time()
        try:
            lease = await self.pool.acquire(deadline, self._accepts(key))
        finally:
            info.queue_wait = loop.time() - queued
        # Nothing between the lease and this task can fail: the task owns the kernel from
        # here and gives it back. A client that goes away no longer cancels it: the cell
        # finishes (within the deadline) and the kernel returns to the pool clean.
        run = asyncio.create_task(self._run(lease, key, document, deadline))
        self._runs.add(run)
        run.add_done_callback(self._run_done)
        info.slot, info.kernel_pid = lease.slot, lease.kernel.pid
        return await asyncio.shield(run)

    def _run_done(self, run: asyncio.Task[Reply]) -> None:
        self._runs.discard(run)
        if not run.cancelled():
            run.exception()  # retrieved: its client may have gone away before it ended

    async def _execute(self, kernel: Kernel, version: Version, key: Key,
                       request: str) -> tuple[ExecutionResult, ExecutionResult | None]:
        """The endpoint's result and its ResponseInfo result, by the cheapest channel."""
        index, endpoint = version.endpoints[key]
        limit = self.settings.max_response_size
        channel = self._direct.get(kernel)
        if channel is not None and channel.serves(index):
            return await channel.call(index, request, limit)
        language = version.notebook.language
        assert self._ipc_dir is not None
        spill = os.path.join(self._ipc_dir, f"request-{uuid.uuid4().hex[:12]}")
        by_file = bind_request_from_file(language, spill) if len(request) > LARGE else None
        try:
            if by_file is None:
                code = bind_request(language, request) + endpoint.source
                content = await self._offload.run(len(code), execute_content, code)
            else:  # too large to be cell code: the kernel reads it from kgpool's 0700 folder
                await self._offload.run(len(request), write_text, spill, request)
                content = execute_content(by_file + endpoint.source)
            result = await kernel.execute("", content=content, limit=limit)
        finally:
            if by_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spill)
        if result.error is not None or endpoint.response_source is None:
            return result, None
        return result, await kernel.execute(endpoint.response_source, limit=limit)

    async def _run(self, lease: Lease, key: Key, request: str,
                   deadline: float | None) -> Reply:
        outcome = "ok"
        started = time.monotonic()
        version = self._versions[lease.version]  # its kernel's version of the endpoint
        try:
            async with asyncio.timeout_at(deadline):
                result, info = await self._execute(lease.kernel, version, key, request)
            return build_reply(result, info, self.settings.max_response_size)
        except TimeoutError:
            outcome = "timeout"
            raise ExecutionTimeout(
                f"the request ran past its {self.settings.timeout:g}s deadline") from None
        except KernelDied:
            outcome = "crash"
            raise
        except (ExecutionError, ResponseInfoError, ResponseTooLarge):
            raise  # the cell failed, the kernel is fine
        except BaseException:
            outcome = "cancelled"
            raise
        finally:
            self.pool.release(lease, outcome)
            self.metrics.executed(key[1], time.monotonic() - started)


def _forkable(notebook: Notebook) -> None:
    if notebook.language != "python":
        raise ConfigError(f"--fork needs a Python kernel; {notebook.name} is a "
                          f"{notebook.language} notebook (serve it without --fork)")


def write_text(path: str, text: str) -> None:
    """A request's document, for the kernel to read (in a helper process when large)."""
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as out:
        out.write(text)
