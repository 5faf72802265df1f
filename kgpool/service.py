"""NotebookService: a notebook (every version being served) and its pool, no HTTP; one deadline
per request covers all phases."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import shutil
import tempfile
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from .kernel import Kernel, execute_content, spec_language
from .languages import (
    Language,
    bind_request_from_file,
    kernel_language,
    read_report,
    transport_for,
)
from .metrics import NotebookMetrics
from .notebook import Endpoint, Notebook
from .offload import Offload
from .outputs import ExecutionResult
from .pool import Accepts, KernelPool, Lease, PoolStatus
from .replies import Reply, build_reply, execution_error
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
    kernel_name: str
    language: Language  # the kernel's (its kernel.json), not the notebook's metadata
    transport: str
    endpoints: dict[Key, tuple[int, Endpoint]] = field(default_factory=dict)  # index, endpoint

    @classmethod
    def of(cls, number: int, notebook: Notebook, settings: Settings) -> Version:
        """ConfigError if kgpool has no inert REQUEST binding for the kernel's language, or its
        kernel spec is not installed."""
        kernel_name = settings.kernel_name or notebook.kernel_name or "python3"
        try:
            name = spec_language(kernel_name)
        except KernelError as exc:
            raise ConfigError(f"{notebook.name}: {exc}; choose one with --kernel-name"
                              ) from None
        language = kernel_language(name, kernel_name, settings.allow_unverified_language)
        if not language.verified:
            log.warning("%s: kernel %r runs %s, whose REQUEST binding no kgpool test has proven "
                        "inert; request bytes might run as code", notebook.name, kernel_name,
                        name or "an unnamed language")
        return cls(number, notebook, Router(notebook.endpoints), kernel_name, language,
                   transport_for(language, settings.transport),
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
        self.current = Version.of(1, notebook, settings)
        log.info("%s: kernel %r runs %s, over %s", notebook.name, self.current.kernel_name,
                 self.current.language.name, self.current.transport)
        self._versions: dict[int, Version] = {1: self.current}
        self._marker = f"kgpool-error-{secrets.token_hex(12)}:"  # see Language.guard
        self.pool = KernelPool(self._make_kernel, kernels or settings.kernels,
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
        self._runs: set[asyncio.Task[Reply]] = set()

    @property
    def notebook(self) -> Notebook:
        return self.current.notebook

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
        self._warm = asyncio.create_task(self.pool.start(), name="kgpool-warm-up")

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
        if self._warm is not None and not self._warm.done():
            self._warm.cancel()
        if self._warm is not None:
            await asyncio.gather(self._warm, return_exceptions=True)
        await self.pool.close()
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
        version = Version.of(max(self._versions) + 1, notebook, self.settings)
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

    def _switch(self, version: Version) -> None:
        log.info("%s: the new version serves from now on; retiring the old kernels one by one",
                 version.notebook.name)
        self.current = version

    async def _make_kernel(self, number: Any, slot: int, on_death: Any) -> Kernel:
        assert self._context is not None and self._ipc_dir is not None, "begin() first"
        version = self._versions[number]
        kernel = Kernel(version.kernel_name, context=self._context, label=f"slot {slot}",
                        on_death=on_death, cwd=self._cwd,
                        ipc_dir=self._ipc_dir if version.transport == "ipc" else None,
                        runtime_dir=self._ipc_dir, env=self._env, offload=self._offload,
                        tmp_dir=os.path.join(self._ipc_dir, f"t{uuid.uuid4().hex[:12]}"))
        cell = None
        try:
            async with asyncio.timeout(self.settings.init_timeout):
                started = time.monotonic()
                await kernel.start()
                language = version.language
                if language.name == "python":
                    stacks = os.path.join(self._ipc_dir, f"stacks-{uuid.uuid4().hex[:12]}")
                    setup = await kernel.execute(setup_code(stacks), silent=True)
                    if setup.error is not None:
                        log.warning("%s: Python setup failed, stdout is not captured: %s: %s",
                                    kernel.label, setup.error.get("ename"),
                                    setup.error.get("evalue"))
                    kernel.stack_file = stacks
                elif language.setup:
                    await kernel.execute(language.setup, silent=True)
                booted = time.monotonic()
                for cell in version.notebook.init_cells:
                    result = await self._run_code(
                        kernel, language, language.guarded(cell.source, self._marker))
                    if result.error is not None:
                        error = execution_error(result.error, language.error)
                        raise InitError(f"init {cell.name} raised {error.ename}: "
                                        f"{error.evalue}")
                self.metrics.kernel_warmed(booted - started, time.monotonic() - booted)
                cell = None
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

    async def _open_direct(self, kernel: Kernel, version: Version) -> None:
        if self.settings.channel != "direct" or version.language.name != "python":
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
        language, marker = version.language, self._marker
        assert self._ipc_dir is not None
        spill = os.path.join(self._ipc_dir, f"request-{uuid.uuid4().hex[:12]}")
        by_file = bind_request_from_file(language.name, spill) if len(request) > LARGE \
            else None
        try:
            if by_file is None:
                code = language.request_code(endpoint.source, request, marker)
            else:  # too large to be cell code: the kernel reads it from kgpool's 0700 folder
                await self._offload.run(len(request), write_text, spill, request)
                code = by_file + language.guarded(language.scope(endpoint.source), marker)
            result = await self._run_code(kernel, language, code, limit)
        finally:
            if by_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spill)
        if result.error is not None or endpoint.response_source is None:
            return result, None
        return result, await self._run_code(
            kernel, language, language.response_code(endpoint.response_source, marker), limit)

    async def _run_code(self, kernel: Kernel, language: Language, code: str,
                        limit: int = 0) -> ExecutionResult:
        """Execute (large code encoded off the event loop); a guarded cell's printed report
        becomes its output and error."""
        content = await self._offload.run(len(code), execute_content, code)
        result = await kernel.execute("", content=content, limit=limit)
        if language.guard is not None:
            report = read_report("".join(result.stdout), self._marker)
            if report is None:  # the kernel's process lives on, the language runtime is gone
                raise KernelDied(f"{kernel.label}: the kernel did not finish the cell "
                                 f"({_stderr(result)})")
            result.stdout, error = [report[0]], report[1]
            result.error = result.error or error
        return result

    async def _run(self, lease: Lease, key: Key, request: str,
                   deadline: float | None) -> Reply:
        outcome = "ok"
        started = time.monotonic()
        version = self._versions[lease.version]  # its kernel's version of the endpoint
        try:
            async with asyncio.timeout_at(deadline):
                result, info = await self._execute(lease.kernel, version, key, request)
            return build_reply(result, info, self.settings.max_response_size,
                               version.language.error)
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


def _stderr(result: ExecutionResult) -> str:
    text = "".join(result.stderr).strip()
    return f"it said {text[-200:]!r}" if text else "it said nothing"


def write_text(path: str, text: str) -> None:
    """A request's document, for the kernel to read (in a helper process when large)."""
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as out:
        out.write(text)
