"""The direct channel: endpoint cells compiled once in a Python kernel and called over a socket.

The Jupyter protocol costs a few milliseconds per execute_request on each side (signing,
envelopes, IPython's run_cell); the cell itself usually takes microseconds. A Python kernel can
instead compile the endpoint cells at warm-up (kgpool/_inkernel.py) and serve them on a private
Unix socket in kgpool's 0700 runtime directory. A call answers with the messages and the
execute_reply an execute_request would have produced, folded by the same code (outputs.py), so
responses, errors, timeouts and crash handling stay identical. Both channels share the kernel's
stdout capture (kgpool/_inkernel_io.py, see `python_setup`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import struct
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from .errors import KernelDied, KernelError
from .kernel import Kernel
from .offload import Offload, loads
from .outputs import ExecutionResult

_HEADER = struct.Struct(">I")
_FILES = resources.files(__package__)
_SOURCE = _FILES.joinpath("_inkernel.py").read_text(encoding="utf-8")
_IO_SOURCE = _FILES.joinpath("_inkernel_io.py").read_text(encoding="utf-8")
_PLOTS_SOURCE = _FILES.joinpath("_inkernel_plots.py").read_text(encoding="utf-8")


def python_setup() -> str:
    """Code run in every Python kernel before its init cells, whichever channel serves it:
    stdout capture per execution (kgpool/_inkernel_io.py) and matplotlib figures as images
    (kgpool/_inkernel_plots.py)."""
    return "".join(f"(lambda ns: (exec({source!r}, ns), ns[{install!r}]()))"
                   "({'get_ipython': get_ipython})\n"
                   for source, install in ((_IO_SOURCE, "_kgpool_io_install"),
                                           (_PLOTS_SOURCE, "_kgpool_plots_install")))


def install_code(path: str, cells: list[tuple[str, str | None]]) -> str:
    """Code for one execute_request that installs the channel; of user globals it touches only
    one private name, deleted again. Endpoint cells go as they are: each call binds REQUEST (or
    REQUESTS) as data, as the Jupyter channel's requests do from their metadata; the recursion
    room is measured from this cell's frame."""
    return (f"_kgpool_ns = {{'get_ipython': get_ipython}}\n"
            "try:\n"
            f"    exec({_SOURCE!r}, _kgpool_ns)\n"
            f"    print(__import__('json').dumps(_kgpool_ns['_kgpool_direct_install']("
            f"{path!r}, {cells!r}, _kgpool_ns['_kgpool_probe']())), end='')\n"
            "finally:\n"
            "    del _kgpool_ns\n")


def call_frame(index: int, request: str | None, batch: list[str] | None = None,
               stream: bool = False) -> bytes:
    """One call on the channel: a 4-byte length and the JSON (a helper process builds it for a
    large request): one REQUEST, or a batch of them, or a streamed call."""
    call: dict[str, Any] = {"e": index, "r": request}
    if batch is not None:
        call["b"] = batch
    if stream:
        call["s"] = 1
    payload = json.dumps(call).encode("utf-8", "surrogateescape")
    return _HEADER.pack(len(payload)) + payload


def _result(part: dict[str, Any], limit: int = 0) -> ExecutionResult:
    """Fold a call's messages and reply exactly as the Jupyter channel folds an execution's."""
    out = ExecutionResult(limit=limit)
    for msg_type, content in part["m"]:
        out.feed(msg_type, content)
    out.feed("status", {"execution_state": "idle"})
    out.reply(part["r"])
    out.answers = part.get("R")
    return out


def _oversized(size: int) -> ExecutionResult:
    """A reply too large to read: only its size is known (the answer will be refused)."""
    return ExecutionResult(idle=True, replied=True, size=size)


class _Frames(asyncio.Protocol):
    """The channel's socket, read as frames (a 4-byte length and the JSON) as they arrive: a
    call waits on one future, with no reader task per call. A frame past `most` bytes is
    skipped as it streams in and given as its size."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.most = 0
        self._buffer = bytearray()
        self._need = _HEADER.size  # bytes the next step waits for
        self._size: int | None = None  # the current frame's, once its header is in
        self._skip = 0  # bytes of an oversized frame still to drop
        self._ready: collections.deque[bytes | int] = collections.deque()
        self._waiter: asyncio.Future[bytes | int] | None = None
        self._error: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            if self._skip:  # an oversized frame: drop what came of it
                dropped = min(self._skip, len(self._buffer))
                del self._buffer[:dropped]
                self._skip -= dropped
                if self._skip:
                    return
                self._deliver(self._size or 0)
                self._size, self._need = None, _HEADER.size
            if len(self._buffer) < self._need:
                return
            if self._size is None:
                self._size = _HEADER.unpack_from(self._buffer)[0]
                del self._buffer[:_HEADER.size]
                if self.most and self._size > self.most:
                    self._skip = self._size
                else:
                    self._need = self._size
                continue
            frame = bytes(self._buffer[:self._size])
            del self._buffer[:self._size]
            self._size, self._need = None, _HEADER.size
            self._deliver(frame)

    def _deliver(self, frame: bytes | int) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)
            self._waiter = None
        else:
            self._ready.append(frame)

    def fail(self, error: BaseException) -> None:
        """No frame comes any more: the waiting call (and every later one) gets `error`."""
        if self._error is None:
            self._error = error
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(self._error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionResetError("the kernel closed the direct channel")
                  if exc is None else exc)

    def next(self) -> asyncio.Future[bytes | int]:
        """The next frame (or oversized frame's size), as a future."""
        future: asyncio.Future[bytes | int] = asyncio.get_running_loop().create_future()
        if self._ready:
            future.set_result(self._ready.popleft())
        elif self._error is not None:
            future.set_exception(self._error)
        else:
            self._waiter = future
        return future


class DirectChannel:
    """A connection to one kernel's compiled endpoints; every wait also watches the kernel."""

    def __init__(self, kernel: Kernel, frames: _Frames, refused: dict[str, str],
                 offload: Offload) -> None:
        # Not the kernel itself: callers key channels by kernel in a WeakKeyDictionary.
        self._label, self._died = kernel.label, kernel.died
        self.refused = {int(k): v for k, v in refused.items()}
        self._frames = frames
        self._offload = offload
        self._died.add_done_callback(self._on_died)

    @classmethod
    async def connect(cls, kernel: Kernel, path: str, refused: dict[str, str],
                      offload: Offload) -> DirectChannel:
        """The channel of a kernel whose compiled endpoints listen at `path`."""
        _, frames = await asyncio.get_running_loop().create_unix_connection(_Frames, path)
        return cls(kernel, frames, refused, offload)

    @classmethod
    async def open(cls, kernel: Kernel, path: str, cells: list[tuple[str, str | None]],
                   offload: Offload | None = None) -> DirectChannel:
        result = await kernel.execute(install_code(path, cells))
        if result.error is not None:
            raise KernelError(f"direct channel install failed: {result.error.get('ename')}: "
                              f"{result.error.get('evalue')}")
        return await cls.connect(kernel, path, json.loads(result.text), offload or Offload())

    def _on_died(self, died: asyncio.Future[KernelDied]) -> None:
        self.close()
        if not died.cancelled():
            self._frames.fail(died.result())

    def serves(self, index: int) -> bool:
        return index not in self.refused

    async def call(self, index: int, request: str | None, limit: int = 0,
                   batch: list[str] | None = None
                   ) -> tuple[ExecutionResult, ExecutionResult | None]:
        """Run endpoint `index` with REQUEST (or REQUESTS, a batch) bound: (endpoint result,
        ResponseInfo result). A reply far past `limit` characters is skipped unread (escaping
        inflates it at most 6-fold), so it never has to be held whole."""
        size = len(request or "") + sum(map(len, batch or ()))
        self._send(await self._offload.run(size, call_frame, index, request, batch), limit)
        data = await self._next()
        if isinstance(data, int):
            return _oversized(data), None
        info = data.get("i")
        return _result(data["c"], limit), (_result(info, limit) if info is not None else None)

    async def stream(self, index: int, request: str, limit: int = 0
                     ) -> AsyncIterator[tuple[str, Any]]:
        """A streamed call: ("head", ResponseInfo result) first if the endpoint has one, then
        ("message", (msg_type, content)) as the cell publishes, then ("end", its result)."""
        self._send(await self._offload.run(len(request), call_frame, index, request, None,
                                           True), limit)
        while True:
            data = await self._next()
            if isinstance(data, int):
                yield "end", _oversized(data)
                return
            if "h" in data:
                yield "head", _result(data["h"], limit)
            elif "p" in data:
                yield "message", tuple(data["p"])
            else:
                yield "end", _result(data["c"], limit)
                return

    def _send(self, frame: bytes, limit: int) -> None:
        transport = self._frames.transport
        if transport is None or transport.is_closing():
            if self._died.done():
                raise self._died.result()
            raise KernelDied(f"{self._label}: direct channel closed")
        self._frames.most = 6 * limit + 65536 if limit else 0
        transport.write(frame)

    async def _next(self) -> dict[str, Any] | int:
        """The next frame, watching the kernel's life (its death fails the wait)."""
        try:
            frame = await self._frames.next()
        except ConnectionError as exc:
            # The socket closes as the process dies; let the pidfd watch say so first.
            died = self._died
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(died), 2.0)
            if died.done():
                raise died.result() from None
            raise KernelDied(f"{self._label}: direct channel closed: {exc}") from None
        if isinstance(frame, int):
            return frame
        return await self._offload.run(len(frame), loads, frame)  # type: ignore[no-any-return]

    def close(self) -> None:
        transport = self._frames.transport
        if transport is not None and not transport.is_closing():
            transport.close()
