"""NotebookService: a notebook (every version being served) and its pool, no HTTP; one deadline
per request covers all phases."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import zmq.asyncio

from .batcher import Batcher, Item
from .checks import plan
from .config import Settings
from .direct import DirectChannel, python_setup
from .errors import (
    BatchError,
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
from .execution import Channels
from .forked import Forker, template_setup
from .kernel import Kernel
from .languages import Language, transport_for
from .memory import MemoryWatch, TemplateInfo
from .metrics import NotebookMetrics
from .notebook import Cell, Endpoint, Notebook, cell_label
from .offload import Offload
from .outputs import ExecutionResult
from .pool import Accepts, KernelPool, Lease, PoolStatus
from .replies import (
    Reply,
    apply_response_info,
    batch_replies,
    build_reply,
    execution_error,
    indent,
    traceback_text,
)
from .requests import RequestData, document_of
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


def _log_init_output(kernel: Kernel, cell: Cell, result: ExecutionResult) -> None:
    """What an init cell printed, at debug level (as a notebook would have shown it)."""
    if log.isEnabledFor(logging.DEBUG):
        for name, text in (("printed", result.text), ("wrote to stderr", "".join(result.stderr))):
            if text.strip():
                log.debug("%s: init %s %s:\n%s", kernel.label, cell.name, name,
                          indent(text[:20000]))


def label_code(notebook: Notebook) -> str:
    """Code that tells a Python kernel how its tracebacks name each cell of the notebook."""
    labels = {cell.source: cell_label((cell.number,), cell.source)
              for cell in notebook.init_cells}
    for ep in notebook.endpoints:
        labels[ep.source] = cell_label(ep.cells, ep.source)
        if ep.response_source is not None:
            labels[ep.response_source] = cell_label(ep.response_cells, ep.response_source)
    return f"get_ipython().kgpool_label_cells({labels!r})\n"


Key = tuple[str, str]  # (method, path template): an endpoint in any version of the notebook


@dataclass
class CallInfo:
    """Filled in as a request goes through the service; the access log reads it."""

    queue_wait: float = 0.0
    slot: int | None = None
    kernel_pid: int | None = None
    batch: str | None = None  # the id of the batch it ran in
    request_id: str = ""  # X-Request-ID, the client's or kgpool's
    # False once the caller's own task holds a kernel: from then on nothing may cancel it for
    # its client leaving (the web layer asks), so that the cell finishes within the deadline
    # and the kernel goes back to the pool clean
    cancellable: bool = True


@dataclass(frozen=True)
class Head:
    """A streamed answer's status and headers (ResponseInfo's, run before the cell)."""

    status: int
    headers: dict[str, str]


@dataclass(frozen=True)
class Piece:
    """Part of a streamed answer: printed text, or a display's mime bundle."""

    kind: str  # "text" or "display"
    data: Any


Part = Head | Piece
T = TypeVar("T")
Work = Callable[[Lease, "Version"], Awaitable[T]]


class _Feed:
    """What a streaming cell publishes -> Parts, within --max-response-size. Called from the
    channel's reading loop: it must never raise; its first failure is kept in `error`."""

    def __init__(self, parts: asyncio.Queue[Part | BaseException | None], limit: int,
                 mode: str) -> None:
        self.parts, self.limit, self.mode = parts, limit, mode
        self.size = 0
        self.abandoned = False
        self.error: BaseException | None = None
        self.stop: Callable[[], object] | None = None  # interrupts the cell (while leased)

    def abandon(self) -> None:
        """Nobody wants the rest: drop it, and stop the cell if it is running."""
        self.abandoned = True
        stop, self.stop = self.stop, None
        if stop is not None:
            stop()

    def emit(self, kind: str, data: Any) -> None:
        if self.abandoned or self.error is not None:
            return
        try:
            if kind == "head":
                self.put(self.head(data))
                return
            msg_type, content = data
            if msg_type == "stream" and content.get("name") != "stderr":
                self.add(Piece("text", content.get("text", "")), len(content.get("text", "")))
            elif msg_type in ("display_data", "update_display_data", "execute_result"):
                bundle = content.get("data") or {}
                self.add(Piece("display", bundle), len(json.dumps(bundle)))
        except Exception as exc:  # a bad ResponseInfo, a bundle JSON cannot write
            self.error = exc

    def head(self, info: ExecutionResult | None) -> Head:
        reply = Reply(headers={"Content-Type": "text/event-stream" if self.mode == "sse"
                               else "text/plain"})
        if info is not None and info.error is None:
            apply_response_info(reply, info.text)
        return Head(reply.status, reply.headers)

    def add(self, piece: Piece, size: int) -> None:
        self.size += size
        if self.limit and self.size > self.limit:
            self.error = ResponseTooLarge(f"the streamed answer passed {self.limit} bytes "
                                          "(--max-response-size)")
            self.put(self.error)
            self.abandon()
            return
        self.put(piece)

    def put(self, part: Part | BaseException) -> None:
        self.parts.put_nowait(part)


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
        """ConfigError / NotebookError for what kgpool cannot serve (kgpool/checks.py); the
        version's notebook carries every warning about it."""
        planned = plan(notebook, settings)
        notebook = planned.notebook
        return cls(number, notebook, Router(notebook.endpoints), planned.kernel_name,
                   planned.language, transport_for(planned.language, settings.transport),
                   {(ep.method, ep.path): (i, ep) for i, ep in enumerate(notebook.endpoints)})


_SUN_PATH = 107  # bytes of a Unix socket's path (sun_path less its NUL), on Linux


def sockets_fit(folder: str) -> bool:
    """Whether the kernels' and the direct channel's socket names fit below `folder`."""
    longest = os.path.join(folder, f"k{'0' * 12}-5")  # a kernel's: "d<12 hex>" is shorter
    return len(os.fsencode(longest)) <= _SUN_PATH


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
        self._forker: Forker | None = None  # --fork: made with the runtime folder
        if settings.fork:
            _forkable(self.current)
        self.pool = KernelPool(self._make_worker if settings.fork else self._make_kernel,
                               kernels or settings.kernels,
                               max_queue=settings.max_queue,
                               max_requests=settings.max_requests,
                               max_requests_jitter=settings.max_requests_jitter,
                               ready_size=settings.ready_kernels, version=1, warmups=warmups,
                               max_size=max_kernels or settings.max_kernels,
                               grow_delay=settings.scale_up_delay,
                               idle_timeout=settings.idle_timeout, listener=metrics)
        self.channels = Channels(self._offload, self._marker, settings.max_response_size)
        self._batchers: dict[Key, Batcher] = {}
        self._context: zmq.asyncio.Context | None = None
        self._ipc_dir: str | None = None
        self._sockets_fit = True
        self._warm: asyncio.Task[None] | None = None
        self._memory: asyncio.Task[None] | None = None
        self._runs: set[asyncio.Task[Any]] = set()

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
        self.channels.folder = self._ipc_dir
        self._sockets_fit = sockets_fit(self._ipc_dir)
        if not self._sockets_fit:
            message = (f"the runtime folder {self._ipc_dir} is too long a path for Unix "
                       "sockets (TMPDIR is long)")
            if self.settings.fork:
                shutil.rmtree(self._ipc_dir, ignore_errors=True)
                raise ConfigError(f"{message}: --fork needs them; set a shorter TMPDIR")
            log.warning("%s: kernels use loopback TCP and the Jupyter channel; a shorter "
                        "TMPDIR gives them IPC and the direct channel", message)
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
        for batcher in self._batchers.values():
            await batcher.close()
        await self.pool.close()
        if self._forker is not None:
            await self._forker.close()
        await asyncio.gather(*self._runs, return_exceptions=True)
        self.channels.close()
        if self._context is not None:
            self._context.destroy(linger=0)
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)

    async def reload(self, notebook: Notebook) -> None:
        """Roll the pool over to a new version of the notebook, one kernel at a time; raises
        (the old version keeps serving) if the first kernel of the new one cannot warm."""
        version = Version.of(max(self._versions) + 1, notebook, self.settings)
        if self.settings.fork:
            _forkable(version)
        for warning in version.notebook.warnings:
            log.warning("%s (new version): %s", notebook.name, warning)
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
        kernel = Kernel(version.kernel_name, context=self._context,
                        label="template" if template else f"slot {slot}", on_death=on_death,
                        cwd=self._cwd,
                        ipc_dir=self._ipc_dir if version.transport == "ipc" and
                        self._sockets_fit else None,
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
                    setup = await kernel.execute(
                        setup_code(stacks) + (template_setup() if template else ""),
                        silent=True)
                    if setup.error is not None:
                        log.warning("%s: Python setup failed, stdout is not captured: %s: %s",
                                    kernel.label, setup.error.get("ename"),
                                    setup.error.get("evalue"))
                    else:
                        kernel.hooked = True
                        await kernel.execute(label_code(version.notebook), silent=True)
                    kernel.stack_file = stacks
                elif language.setup:
                    await kernel.execute(language.setup, silent=True)
                booted = time.monotonic()
                for cell in version.notebook.init_cells:
                    result = await self.channels.run_code(
                        kernel, language, language.guarded(cell.source, self._marker))
                    _log_init_output(kernel, cell, result)
                    if result.error is not None:
                        error = execution_error(result.error, language.error, cell.name)
                        log.error("%s: init %s raised %s: %s%s", kernel.label, cell.name,
                                  error.ename, error.evalue, traceback_text(error))
                        raise InitError(f"init {cell.name} raised {error.ename}: "
                                        f"{error.evalue}")
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
        self.channels.direct[cast(Kernel, worker)] = worker.channel
        return cast(Kernel, worker)  # the pool uses only the kernel interface it implements

    async def _open_direct(self, kernel: Kernel, version: Version) -> None:
        if self.settings.channel != "direct" or version.language.name != "python" or \
                not self._sockets_fit:
            return
        assert self._ipc_dir is not None
        path = os.path.join(self._ipc_dir, f"d{uuid.uuid4().hex[:12]}")  # short: sun_path
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
        self.channels.direct[kernel] = channel

    # ----- requests ------------------------------------------------------------------------

    def _accepts(self, key: Key) -> Accepts | None:
        """Which versions' kernels can run `key`: all of them (None), unless a reload changed
        it; EndpointRemoved if none can (a reload removed it while the request was read)."""
        having = {n for n, version in self._versions.items() if key in version.endpoints}
        if not having:
            raise EndpointRemoved("a reload removed this endpoint")
        return None if len(having) == len(self._versions) else having.__contains__

    def _deadline(self) -> float | None:
        timeout = self.settings.request_timeout
        return asyncio.get_running_loop().time() + timeout if timeout else None

    async def call(self, endpoint: Endpoint, request: RequestData,
                   info: CallInfo | None = None) -> Reply:
        """Run an endpoint for one request within the request's deadline (in a batch, for a
        batched endpoint)."""
        info = info or CallInfo()
        deadline = self._deadline()
        # before a kernel is leased (it may fail), and off the event loop if it is large
        document = await self._document(endpoint, request, info)
        key = (endpoint.method, endpoint.path)
        if endpoint.batch is not None:
            return await self._batcher(key, endpoint).submit(document, deadline, info)

        async def work(lease: Lease, version: Version) -> Reply:
            index, ep = version.endpoints[key]
            result, response = await self.channels.single(lease.kernel, version.language,
                                                           index, ep, document)
            return build_reply(result, response, self.settings.max_response_size,
                               version.language.error, ep.names)
        return await self._leased(key, deadline, info, work, in_callers_task=True)

    async def _document(self, endpoint: Endpoint, request: RequestData, info: CallInfo) -> str:
        """The REQUEST document (off the event loop if it is large); a body that is not what
        its Content-Type says is noted in the log, where the cell's error will be too."""
        document, note = await self._offload.run(len(request.body), document_of, request)
        if note:
            log.info("%s %s (request %s): %s", endpoint.method, endpoint.path, info.request_id,
                     note)
        return document

    async def _leased(self, key: Key, deadline: float | None, info: CallInfo,
                      work: Work[T], *, in_callers_task: bool = False) -> T:
        """work(lease, its version) with a kernel leased until the deadline. Nothing between
        the lease and the work can fail: _owned gives the kernel back. `in_callers_task`:
        the caller is the request's own task (not a batch's or a stream's producer), which
        info.cancellable then marks as holding a kernel."""
        loop = asyncio.get_running_loop()
        queued = loop.time()
        try:
            lease = await self.pool.acquire(deadline, self._accepts(key))
        finally:
            info.queue_wait = loop.time() - queued
        if in_callers_task:
            info.cancellable = False
        info.slot, info.kernel_pid = lease.slot, lease.kernel.pid
        return await self._owned(lease, key, deadline, work)

    def _run_done(self, run: asyncio.Task[Any]) -> None:
        self._runs.discard(run)
        if not run.cancelled():
            run.exception()  # retrieved: its client may have gone away before it ended

    async def _owned(self, lease: Lease, key: Key, deadline: float | None,
                     work: Work[T]) -> T:
        outcome = "ok"
        started = time.monotonic()
        version = self._versions[lease.version]  # its kernel's version of the endpoint
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        if deadline is not None:
            lease.deadline.watch(task, deadline)
        try:
            result = await work(lease, version)
            if lease.deadline.expired:  # work swallowed the cancellation: undo it
                task.uncancel()
            return result
        except (TimeoutError, asyncio.CancelledError) as exc:
            if isinstance(exc, TimeoutError) or (
                    lease.deadline.expired and task.uncancel() <= cancelling):
                outcome = "timeout"
                raise ExecutionTimeout(f"the request ran past its "
                                       f"{self.settings.timeout:g}s deadline") from None
            outcome = "cancelled"  # its state is unknown: replaced
            raise
        except KernelDied:
            outcome = "crash"
            raise
        except (ExecutionError, ResponseInfoError, ResponseTooLarge, BatchError):
            raise  # the cell failed, the kernel is fine
        except BaseException:
            outcome = "cancelled"  # its state is unknown: replaced
            log.error("%s: the request failed inside kgpool", lease.kernel.label,
                      exc_info=True)
            raise
        finally:
            lease.deadline.stop()
            self.pool.release(lease, outcome)
            self.metrics.executed(key[1], time.monotonic() - started)

    # ----- batches -------------------------------------------------------------------------

    def _batcher(self, key: Key, endpoint: Endpoint) -> Batcher:
        batcher = self._batchers.get(key)
        if batcher is None:
            assert endpoint.batch is not None
            bound = max(1, self.settings.max_queue) * endpoint.batch.max_size
            batcher = self._batchers[key] = Batcher(
                endpoint.batch, lambda batch_id, items: self._run_batch(key, batch_id, items),
                bound, f"{self.notebook.name}: {key[0]} {key[1]}")
        return batcher

    async def _run_batch(self, key: Key, batch_id: str, items: list[Item]) -> None:
        """One batch on one kernel; every item gets its own answer (or error)."""
        items = [item for item in items if not item.future.done()]  # those still waiting
        if not items:
            return
        deadlines = [item.deadline for item in items if item.deadline is not None]
        self.metrics.batched(key[1], len(items))
        for item in items:
            item.info.batch = batch_id

        async def work(lease: Lease, version: Version) -> list[Reply | Exception]:
            index, ep = version.endpoints[key]
            result, response = await self.channels.batch(
                lease.kernel, version.language, index, ep, [item.document for item in items])
            return batch_replies(result, response, len(items),
                                 self.settings.max_response_size, version.language.error,
                                 ep.names)
        try:
            answers = await self._leased(key, min(deadlines) if deadlines else None,
                                         items[0].info, work)
        except Exception as exc:  # the whole batch failed: every request with it
            answers = [exc] * len(items)
        for item, answer in zip(items, answers, strict=True):
            if item.future.done():
                continue  # its client left, or its own deadline passed
            if isinstance(answer, Exception):
                item.future.set_exception(answer)
            else:
                item.future.set_result(answer)
        for item in items[1:]:
            item.info.queue_wait, item.info.slot = items[0].info.queue_wait, items[0].info.slot
            item.info.kernel_pid = items[0].info.kernel_pid

    # ----- streams -------------------------------------------------------------------------

    async def stream(self, endpoint: Endpoint, request: RequestData,
                     info: CallInfo | None = None) -> AsyncGenerator[Part, None]:
        """A streamed answer: first the Head (status and headers, after ResponseInfo), then
        each Piece the cell prints or displays, as it comes. An error raises from the
        iteration; the deadline and --max-response-size hold as for any answer. If the caller
        stops iterating (its client left) or the answer passes the limit, the cell is
        interrupted and its kernel kept; the rest of its output is dropped."""
        info = info or CallInfo()
        deadline = self._deadline()
        document = await self._document(endpoint, request, info)
        key = (endpoint.method, endpoint.path)
        parts: asyncio.Queue[Part | BaseException | None] = asyncio.Queue()
        feed = _Feed(parts, self.settings.max_response_size, endpoint.stream or "chunked")

        async def work(lease: Lease, version: Version) -> None:
            index, ep = version.endpoints[key]
            if feed.abandoned:  # the client left while this waited for a kernel
                return
            # Only while the lease is held: an interrupt must never reach the next request.
            feed.stop = lease.kernel.interrupt
            try:
                result = await self.channels.stream(lease.kernel, version.language, index,
                                                    ep, document, feed.emit)
            finally:
                feed.stop = None
            if feed.abandoned:
                if result.error is not None:
                    log.info("%s: a streamed answer nobody reads any more was stopped (%s)",
                             lease.kernel.label, result.error.get("ename"))
                return
            if result.error is not None:
                raise execution_error(result.error, version.language.error, ep.names[0])
            if feed.error is not None and not isinstance(feed.error, ResponseTooLarge):
                raise feed.error

        async def produce() -> None:
            try:
                await self._leased(key, deadline, info, work)
                parts.put_nowait(None)
            except BaseException as exc:
                parts.put_nowait(exc)

        producer = asyncio.ensure_future(produce())
        try:
            while True:
                part = await parts.get()
                if part is None:
                    return
                if isinstance(part, BaseException):
                    raise part
                yield part
        finally:
            if not producer.done():
                # the client left: the cell is interrupted (a kernel that shrugs that off is
                # stopped at the deadline); what it still prints goes nowhere
                feed.abandon()
                self._runs.add(producer)
                producer.add_done_callback(self._run_done)
def _forkable(version: Version) -> None:
    if version.language.name != "python":
        raise ConfigError(f"--fork needs a Python kernel; {version.notebook.name} is served "
                          f"by {version.kernel_name!r}, a {version.language.name} kernel (serve "
                          "it without --fork)")
