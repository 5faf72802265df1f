"""A streamed answer on the wire: chunked text as the cell prints it, or Server-Sent Events
(one event per printed line, `event: display` for each display, `event: error` if the cell
fails midway, `event: end` when it is done, so an EventSource knows to close rather than
reconnect and run the cell again). The status and headers go out with the first piece, so a
cell that fails before printing still gets a plain JSON error."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from typing import Any

from aiohttp import web

from .service import Head, Part, Piece

ErrorBody = Callable[[BaseException], tuple[web.Response, dict[str, Any]]]


class Writer:
    """One streamed answer; `mode` is "chunked" or "sse"."""

    def __init__(self, request: web.Request, mode: str) -> None:
        self.request, self.mode = request, mode
        self.head: Head | None = None
        self.response: web.StreamResponse | None = None
        self.line = ""  # sse: printed text not yet ended by a newline

    async def send(self, parts: AsyncGenerator[Part, None],
                   error: ErrorBody) -> web.StreamResponse:
        try:
            return await self._send(parts, error)
        finally:
            await parts.aclose()  # now, not when collected: a cell nobody reads is stopped

    async def _send(self, parts: AsyncGenerator[Part, None],
                    error: ErrorBody) -> web.StreamResponse:
        try:
            async for part in parts:
                if isinstance(part, Head):
                    self.head = part
                elif isinstance(part, Piece):
                    await self.piece(part)
        except ConnectionError as exc:
            if self.response is not None:  # the client left mid-stream: nobody to tell
                return self.response
            return error(exc)[0]
        except Exception as exc:
            answer, body = error(exc)
            if self.response is None:  # nothing went out yet: an ordinary error answer
                return answer
            if self.mode == "sse":  # the client learns why the stream ends here
                await self.flush_line()
                await self.write(f"event: error\ndata: {json.dumps(body)}\n\n")
                await self.response.write_eof()
            elif self.request.transport is not None:
                self.request.transport.close()  # no last chunk: the client sees it cut off
            return self.response
        await self.flush_line()
        if self.mode == "sse":
            await self.write("event: end\ndata: \n\n")
        if self.response is None:  # the cell printed nothing: an empty answer
            head = self.head or Head(200, {"Content-Type": "text/plain"})
            return web.Response(status=head.status, headers=head.headers)
        await self.response.write_eof()
        return self.response

    async def piece(self, piece: Piece) -> None:
        if self.mode == "chunked":
            if piece.kind == "text" and piece.data:
                await self.write(piece.data)
            return
        if piece.kind == "display":
            await self.flush_line()
            await self.write(f"event: display\ndata: {json.dumps(piece.data)}\n\n")
            return
        text = self.line + piece.data
        if text.endswith("\r"):  # perhaps the first half of a CRLF: wait for the rest
            text, pending = text[:-1], "\r"
        else:
            pending = ""
        # CR, LF and CRLF all end a line of an event stream: each printed line is one event
        *lines, self.line = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self.line += pending
        for line in lines:
            await self.write(f"data: {line}\n\n")

    async def flush_line(self) -> None:
        if self.mode == "sse" and self.line:
            line, self.line = self.line.rstrip("\r"), ""
            await self.write(f"data: {line}\n\n")

    async def write(self, text: str) -> None:
        if self.response is None:
            head = self.head or Head(200, {})
            self.response = web.StreamResponse(status=head.status, headers=head.headers)
            if self.mode == "sse":
                self.response.headers.setdefault("Cache-Control", "no-cache")
                self.response.headers.setdefault("X-Accel-Buffering", "no")  # proxies: do not
            await self.response.prepare(self.request)
        await self.response.write(text.encode("utf-8", errors="surrogateescape"))
