"""How a request's code reaches a kernel: over the direct channel when the kernel compiled the
endpoint, else as an execute_request, for one request, a batch, or a streamed answer. Both ways
give the same ExecutionResults, so everything above them answers alike."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import uuid
import weakref
from collections.abc import Callable
from typing import Any

from .direct import DirectChannel
from .errors import KernelDied, KernelError
from .kernel import Kernel, execute_content
from .languages import Language, bind_request_from_file, read_report
from .notebook import Endpoint
from .offload import Offload
from .outputs import ExecutionResult
from .wire import encode_content

LARGE = 64 * 1024  # characters of REQUEST past which a Python kernel reads it from a file
# evaluated after a batched cell on the Jupyter channel: its RESPONSES, encoded in the kernel
RESPONSES = {"kgpool": "get_ipython().kgpool_responses()"}
Emit = Callable[[str, Any], None]  # ("head", ResponseInfo result | None) / ("message", ...)
Results = tuple[ExecutionResult, ExecutionResult | None]  # the endpoint's, its ResponseInfo's


class Channels:
    """The direct channels of one service's kernels, and the Jupyter channel for the rest."""

    def __init__(self, offload: Offload, marker: str, limit: int) -> None:
        self.offload, self.marker, self.limit = offload, marker, limit
        self.direct: weakref.WeakKeyDictionary[Kernel, DirectChannel] = \
            weakref.WeakKeyDictionary()
        self.folder: str | None = None  # kgpool's 0700 runtime folder (large requests)

    def close(self) -> None:
        for channel in list(self.direct.values()):
            channel.close()

    def _direct(self, kernel: Kernel, index: int) -> DirectChannel | None:
        channel = self.direct.get(kernel)
        return channel if channel is not None and channel.serves(index) else None

    async def run_code(self, kernel: Kernel, language: Language, code: str, *,
                       stream: bool = False, watch: Emit | None = None,
                       expressions: dict[str, str] | None = None,
                       bind: dict[str, Any] | None = None) -> ExecutionResult:
        """Execute (large code encoded off the event loop); a guarded cell's printed report
        becomes its output and error. `bind`: REQUEST (or REQUESTS) for a kernel with kgpool's
        set-up, which binds it from the request's metadata."""
        content = await self.offload.run(len(code), execute_content, code, False, expressions)
        metadata = None
        if bind is not None:
            size = sum(len(v) if isinstance(v, str) else sum(map(len, v)) for v in bind.values())
            metadata = await self.offload.run(size, encode_content,
                                              {**bind, "kgpool_stream": stream})
        result = await kernel.execute("", content=content, limit=self.limit, stream=stream,
                                      watch=_messages(watch) if watch else None,
                                      metadata=metadata)
        if language.guard is not None:
            report = read_report("".join(result.stdout), self.marker)
            if report is None:  # the kernel's process lives on, the language runtime is gone
                raise KernelDied(f"{kernel.label}: the kernel did not finish the cell "
                                 f"({_stderr(result)})")
            result.stdout, error = [report[0]], report[1]
            result.error = result.error or error
        return result

    async def single(self, kernel: Kernel, language: Language, index: int,
                     endpoint: Endpoint, request: str) -> Results:
        """One request: its endpoint's result and its ResponseInfo's."""
        channel = self._direct(kernel, index)
        if channel is not None:
            return await channel.call(index, request, self.limit)
        if kernel.hooked:  # the cell as it is; REQUEST rides in the request's metadata
            result = await self.run_code(kernel, language, self._cell(language, endpoint),
                                         bind={"kgpool_request": request})
            return result, await self._response_info(kernel, language, endpoint, result)
        assert self.folder is not None
        spill = os.path.join(self.folder, f"request-{uuid.uuid4().hex[:12]}")
        by_file = bind_request_from_file(language.name, spill) if len(request) > LARGE \
            else None
        try:
            if by_file is None:
                code = language.request_code(endpoint.source, request, self.marker)
            else:  # too large to be cell code: the kernel reads it from kgpool's 0700 folder
                await self.offload.run(len(request), write_text, spill, request)
                code = by_file + language.guarded(language.scope(endpoint.source), self.marker)
            result = await self.run_code(kernel, language, code)
        finally:
            if by_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spill)
        return result, await self._response_info(kernel, language, endpoint, result)

    async def batch(self, kernel: Kernel, language: Language, index: int, endpoint: Endpoint,
                    requests: list[str]) -> Results:
        """A batch: REQUESTS bound, RESPONSES read back (result.answers)."""
        channel = self._direct(kernel, index)
        if channel is not None:
            return await channel.call(index, None, self.limit, batch=requests)
        if not kernel.hooked:
            raise KernelError(f"{kernel.label}: kgpool's Python set-up failed in this kernel; "
                              "batched endpoints need it")
        result = await self.run_code(kernel, language, self._cell(language, endpoint),
                                     expressions=RESPONSES, bind={"kgpool_requests": requests})
        result.answers = _answers(result)
        return result, await self._response_info(kernel, language, endpoint, result)

    async def stream(self, kernel: Kernel, language: Language, index: int,
                     endpoint: Endpoint, request: str, emit: Emit) -> ExecutionResult:
        """A streamed answer: ResponseInfo runs first ("head"), then every message the cell
        publishes goes to `emit` as it comes; returns the endpoint's result."""
        channel = self._direct(kernel, index)
        if channel is not None:
            if endpoint.response_source is None:
                emit("head", None)
            async for kind, data in channel.stream(index, request, self.limit):
                if kind == "end":
                    return data  # type: ignore[no-any-return]
                emit(kind, data)
            raise KernelDied(f"{kernel.label}: the stream ended without a result")
        info = None
        if endpoint.response_source is not None and kernel.hooked:
            info = await self.run_code(kernel, language, language.response_code(
                endpoint.response_source, self.marker), bind={"kgpool_request": request})
        elif endpoint.response_source is not None:
            info = await self.run_code(kernel, language, language.request_code(
                endpoint.response_source, request, self.marker))
        emit("head", info)
        if info is not None and info.error is not None:
            return info  # the ResponseInfo cell failed: the endpoint does not run
        if kernel.hooked:
            return await self.run_code(kernel, language, self._cell(language, endpoint),
                                       stream=True, watch=emit,
                                       bind={"kgpool_request": request})
        return await self.run_code(
            kernel, language, language.request_code(endpoint.source, request, self.marker),
            stream=True, watch=emit)

    def _cell(self, language: Language, endpoint: Endpoint) -> str:
        return language.guarded(language.scope(endpoint.source), self.marker)

    async def _response_info(self, kernel: Kernel, language: Language, endpoint: Endpoint,
                             result: ExecutionResult) -> ExecutionResult | None:
        if result.error is not None or endpoint.response_source is None:
            return None
        return await self.run_code(kernel, language, language.response_code(
            endpoint.response_source, self.marker))


def _messages(emit: Emit) -> Callable[[str, dict[str, Any]], None]:
    return lambda msg_type, content: emit("message", (msg_type, content))


def _answers(result: ExecutionResult) -> Any:
    """RESPONSES from the reply's user_expressions: its text/plain is the repr of the JSON."""
    value = result.expressions.get("kgpool") or {}
    text = (value.get("data") or {}).get("text/plain")
    if value.get("status") != "ok" or not isinstance(text, str):
        return None
    try:
        return json.loads(ast.literal_eval(text))
    except (ValueError, SyntaxError):
        return None


def _stderr(result: ExecutionResult) -> str:
    text = "".join(result.stderr).strip()
    return f"it said {text[-200:]!r}" if text else "it said nothing"


def write_text(path: str, text: str) -> None:
    """A request's document, for the kernel to read (in a helper process when large)."""
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as out:
        out.write(text)
