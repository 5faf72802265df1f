"""NotebookService: a notebook and its pool, no HTTP; one deadline per request covers all phases."""

from __future__ import annotations

import asyncio
import json
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
from .direct import DirectChannel
from .errors import (
    ConfigError,
    ExecutionError,
    ExecutionTimeout,
    InitError,
    KernelDied,
    KernelError,
    ResponseInfoError,
)
from .kernel import Kernel, spec_language
from .languages import Language, kernel_language, read_report, transport_for
from .metrics import NotebookMetrics
from .notebook import Endpoint, Notebook
from .outputs import ExecutionResult, choose_body
from .pool import KernelPool, Lease, PoolStatus
from .requests import RequestData, request_document

log = logging.getLogger(__name__)

NO_BODY_STATUSES = frozenset({204, 304})


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "text/plain"})
    body: bytes = b""


@dataclass
class CallInfo:
    """Filled in as a request goes through the service; the access log reads it."""

    queue_wait: float = 0.0
    slot: int | None = None
    kernel_pid: int | None = None


class NotebookService:
    def __init__(self, notebook: Notebook, settings: Settings, metrics: NotebookMetrics, *,
                 path: Path | None = None, kernels: int | None = None) -> None:
        self.notebook = notebook
        self.settings = settings
        self.metrics = metrics
        self.kernel_name = settings.kernel_name or notebook.kernel_name
        self.language = self._language()  # the kernel's, not the notebook's metadata
        self.transport = transport_for(self.language, settings.transport)
        self._marker = f"kgpool-error-{secrets.token_hex(12)}:"  # see Language.guard
        self._cwd = str(path.resolve().parent) if path is not None else None
        self._context = zmq.asyncio.Context()
        self._ipc_dir = tempfile.mkdtemp(prefix="kgpool-")
        self.pool = KernelPool(self._make_kernel, kernels or settings.kernels,
                               max_queue=settings.max_queue,
                               max_requests=settings.max_requests,
                               max_requests_jitter=settings.max_requests_jitter,
                               listener=metrics)
        self._index = {ep: i for i, ep in enumerate(notebook.endpoints)}
        self._direct: weakref.WeakKeyDictionary[Kernel, DirectChannel] = \
            weakref.WeakKeyDictionary()
        self._warm: asyncio.Task[None] | None = None
        self._runs: set[asyncio.Task[Reply]] = set()

    def _language(self) -> Language:
        """The language of the kernel spec that will be started; ConfigError if kgpool has no
        inert REQUEST binding for it (or the spec is not installed)."""
        try:
            name = spec_language(self.kernel_name)
        except KernelError as exc:
            raise ConfigError(f"{self.notebook.name}: {exc}; choose one with --kernel-name"
                              ) from None
        entry = kernel_language(name, self.kernel_name, self.settings.allow_unverified_language)
        log.info("%s: kernel %r runs %s, over %s", self.notebook.name, self.kernel_name,
                 entry.name, transport_for(entry, self.settings.transport))
        if not entry.verified:
            log.warning("%s: kernel %r runs %s, whose REQUEST binding no kgpool test has proven "
                        "inert; request bytes might run as code", self.notebook.name,
                        self.kernel_name, name or "an unnamed language")
        return entry

    # ----- life cycle ----------------------------------------------------------------------

    def begin(self) -> None:
        """Start warming the pool in the background; `warmed()` reports the outcome."""
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
        self._context.destroy(linger=0)
        shutil.rmtree(self._ipc_dir, ignore_errors=True)

    async def _make_kernel(self, slot: int, on_death: Any) -> Kernel:
        kernel = Kernel(self.kernel_name, context=self._context, label=f"slot {slot}",
                        on_death=on_death, cwd=self._cwd,
                        ipc_dir=self._ipc_dir if self.transport == "ipc" else None,
                        tmp_dir=os.path.join(self._ipc_dir, f"t{uuid.uuid4().hex[:12]}"))
        cell = None
        try:
            async with asyncio.timeout(self.settings.init_timeout):
                started = time.monotonic()
                await kernel.start()
                if self.language.setup:
                    await kernel.execute(self.language.setup, silent=True)
                booted = time.monotonic()
                for cell in self.notebook.init_cells:
                    result = await self._run_code(kernel, self.language.guarded(cell.source,
                                                                                self._marker))
                    if result.error is not None:
                        error = _execution_error(result.error, self.language)
                        raise InitError(f"init cell {cell.index} ({cell.first_line!r}) raised "
                                        f"{error.ename}: {error.evalue}")
                self.metrics.kernel_warmed(booted - started, time.monotonic() - booted)
                cell = None
                await self._open_direct(kernel)
        except BaseException as exc:
            await kernel.shutdown()
            where = f" in init cell {cell.index} ({cell.first_line!r})" if cell else ""
            if isinstance(exc, TimeoutError):
                raise InitError(
                    f"kernel not warm after {self.settings.init_timeout:g}s{where}") from None
            if isinstance(exc, KernelDied):
                raise InitError(f"kernel died{where} (exit code {exc.exit_code})") from None
            if isinstance(exc, KernelError):
                raise InitError(str(exc)) from None
            raise
        return kernel

    async def _open_direct(self, kernel: Kernel) -> None:
        if self.settings.channel != "direct" or self.language.name != "python":
            return
        path = os.path.join(self._ipc_dir, f"d{uuid.uuid4().hex[:12]}.sock")
        cells = [(ep.source, ep.response_source) for ep in self.notebook.endpoints]
        try:
            channel = await DirectChannel.open(kernel, path, cells)
        except (KernelError, OSError, ValueError) as exc:
            log.warning("%s: direct channel unavailable, using the Jupyter channel: %s",
                        kernel.label, exc)
            return
        for index, reason in channel.refused.items():
            ep = self.notebook.endpoints[index]
            log.info("%s %s runs on the Jupyter channel: %s", ep.method, ep.path, reason)
        self._direct[kernel] = channel

    # ----- requests ------------------------------------------------------------------------

    async def call(self, endpoint: Endpoint, request: RequestData,
                   info: CallInfo | None = None) -> Reply:
        """Run an endpoint for one request within the request's deadline."""
        info = info or CallInfo()
        timeout = self.settings.request_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        queued = loop.time()
        try:
            lease = await self.pool.acquire(deadline)
        finally:
            info.queue_wait = loop.time() - queued
        info.slot, info.kernel_pid = lease.slot, lease.kernel.pid
        # Once a kernel runs the cell, a client that goes away no longer cancels it: the
        # cell finishes (within the deadline) and the kernel returns to the pool clean.
        run = asyncio.create_task(self._run(lease, endpoint, request_document(request),
                                            deadline))
        self._runs.add(run)
        run.add_done_callback(self._run_done)
        return await asyncio.shield(run)

    def _run_done(self, run: asyncio.Task[Reply]) -> None:
        self._runs.discard(run)
        if not run.cancelled():
            run.exception()  # retrieved: its client may have gone away before it ended

    async def _execute(self, kernel: Kernel, endpoint: Endpoint,
                       request: str) -> tuple[ExecutionResult, ExecutionResult | None]:
        """The endpoint's result and its ResponseInfo result, by the cheapest channel."""
        index = self._index[endpoint]
        channel = self._direct.get(kernel)
        if channel is not None and channel.serves(index):
            return await channel.call(index, request)
        language, marker = self.language, self._marker
        result = await self._run_code(kernel, language.request_code(endpoint.source, request,
                                                                     marker))
        if result.error is not None or endpoint.response_source is None:
            return result, None
        return result, await self._run_code(kernel, language.response_code(
            endpoint.response_source, marker))

    async def _run_code(self, kernel: Kernel, code: str) -> ExecutionResult:
        """Execute; a guarded cell's printed report becomes its output and error."""
        result = await kernel.execute(code)
        if self.language.guard is not None:
            report = read_report("".join(result.stdout), self._marker)
            if report is None:  # the kernel's process lives on, the language runtime is gone
                raise KernelDied(f"{kernel.label}: the kernel did not finish the cell "
                                 f"({_stderr(result)})")
            result.stdout, error = [report[0]], report[1]
            result.error = result.error or error
        return result

    async def _run(self, lease: Lease, endpoint: Endpoint, request: str,
                   deadline: float | None) -> Reply:
        outcome = "ok"
        started = time.monotonic()
        try:
            async with asyncio.timeout_at(deadline):
                result, info = await self._execute(lease.kernel, endpoint, request)
            if result.error is not None:
                raise _execution_error(result.error, self.language)
            reply = Reply()
            asked = None
            if info is not None:
                if info.error is not None:
                    raise _execution_error(info.error, self.language)
                if _apply_response_info(reply, info.text):
                    asked = next(v for k, v in reply.headers.items()
                                 if k.lower() == "content-type").split(";")[0].strip().lower()
            reply.body, content_type = choose_body(result, asked)
            if content_type is not None and asked is None:
                reply.headers["Content-Type"] = content_type
            if reply.status in NO_BODY_STATUSES:
                reply.body = b""
            return reply
        except TimeoutError:
            outcome = "timeout"
            raise ExecutionTimeout(
                f"the request ran past its {self.settings.timeout:g}s deadline") from None
        except KernelDied:
            outcome = "crash"
            raise
        except (ExecutionError, ResponseInfoError):
            raise  # the cell failed, the kernel is fine
        except BaseException:
            outcome = "cancelled"
            raise
        finally:
            self.pool.release(lease, outcome)
            self.metrics.executed(endpoint.path, time.monotonic() - started)


def _stderr(result: ExecutionResult) -> str:
    text = "".join(result.stderr).strip()
    return f"it said {text[-200:]!r}" if text else "it said nothing"


def _execution_error(error: dict[str, Any], language: Language) -> ExecutionError:
    ename, evalue = language.error(str(error.get("ename") or ""), str(error.get("evalue", "")))
    return ExecutionError(ename, evalue, list(error.get("traceback", [])))


def _apply_response_info(reply: Reply, text: str) -> bool:
    """A ResponseInfo cell prints {"status": int, "headers": {...}}; anything else is an error.
    True if it set the Content-Type."""
    try:
        info = json.loads(text)
    except ValueError:
        raise ResponseInfoError(f"ResponseInfo printed no JSON object: {text[:200]!r}") from None
    if not isinstance(info, dict):
        raise ResponseInfoError("ResponseInfo must print a JSON object")
    status = info.get("status", 200)
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise ResponseInfoError(f"ResponseInfo status must be an integer 100..599, not {status!r}")
    headers = info.get("headers", {})
    if not isinstance(headers, dict):
        raise ResponseInfoError("ResponseInfo headers must be a JSON object")
    reply.status = status
    for name, value in headers.items():
        if any(ch in f"{name}{value}" for ch in "\r\n"):
            raise ResponseInfoError(f"ResponseInfo header {name!r} contains a line break")
        for existing in [k for k in reply.headers if k.lower() == str(name).lower()]:
            del reply.headers[existing]
        reply.headers[str(name)] = str(value)
    return any(str(name).lower() == "content-type" for name in headers)
