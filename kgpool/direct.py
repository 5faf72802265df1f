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


class DirectChannel:
    """A connection to one kernel's compiled endpoints; every wait also watches the kernel."""

    def __init__(self, kernel: Kernel, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, refused: dict[str, str],
                 offload: Offload) -> None:
        # Not the kernel itself: callers key channels by kernel in a WeakKeyDictionary.
        self._label, self._died = kernel.label, kernel.died
        self.refused = {int(k): v for k, v in refused.items()}
        self._reader, self._writer = reader, writer
        self._offload = offload
        self._died.add_done_callback(lambda _: self.close())

    @classmethod
    async def open(cls, kernel: Kernel, path: str, cells: list[tuple[str, str | None]],
                   offload: Offload | None = None) -> DirectChannel:
        result = await kernel.execute(install_code(path, cells))
        if result.error is not None:
            raise KernelError(f"direct channel install failed: {result.error.get('ename')}: "
                              f"{result.error.get('evalue')}")
        refused = json.loads(result.text)
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(kernel, reader, writer, refused, offload or Offload())

    def serves(self, index: int) -> bool:
        return index not in self.refused

    async def call(self, index: int, request: str | None, limit: int = 0,
                   batch: list[str] | None = None
                   ) -> tuple[ExecutionResult, ExecutionResult | None]:
        """Run endpoint `index` with REQUEST (or REQUESTS, a batch) bound: (endpoint result,
        ResponseInfo result). A reply far past `limit` characters is skipped unread (escaping
        inflates it at most 6-fold), so it never has to be held whole."""
        size = len(request or "") + sum(map(len, batch or ()))
        self._writer.write(await self._offload.run(size, call_frame, index, request, batch))
        data = await self._next(6 * limit + 65536 if limit else 0)
        if isinstance(data, int):
            return _oversized(data), None
        info = data.get("i")
        return _result(data["c"], limit), (_result(info, limit) if info is not None else None)

    async def stream(self, index: int, request: str, limit: int = 0
                     ) -> AsyncIterator[tuple[str, Any]]:
        """A streamed call: ("head", ResponseInfo result) first if the endpoint has one, then
        ("message", (msg_type, content)) as the cell publishes, then ("end", its result)."""
        self._writer.write(await self._offload.run(len(request), call_frame, index, request,
                                                   None, True))
        while True:
            data = await self._next(6 * limit + 65536 if limit else 0)
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

    async def _next(self, most: int) -> dict[str, Any] | int:
        """The next frame, watching the kernel's life."""
        reply = asyncio.ensure_future(self._read(most))
        died = self._died
        waits: list[asyncio.Future[Any]] = [reply, died]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not reply.done():  # kernel died, or our deadline cancelled us
                reply.cancel()
        if reply.cancelled():
            raise died.result()
        try:
            data = reply.result()
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            # The socket closes as the process dies; let the pidfd watch say so first.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(died), 2.0)
            if died.done():
                raise died.result() from None
            raise KernelDied(f"{self._label}: direct channel closed: {exc}") from None
        return data

    async def _read(self, most: int) -> dict[str, Any] | int:
        """The next reply, or the size of one past `most` bytes, which is skipped."""
        size = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))[0]
        if most and size > most:
            left = size
            while left:
                left -= len(await self._reader.readexactly(min(left, 1 << 20)))
            return int(size)
        data = await self._reader.readexactly(size)  # as ipykernel packs messages:
        return await self._offload.run(size, loads, data)  # type: ignore[no-any-return]

    def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()
