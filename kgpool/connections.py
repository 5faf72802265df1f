"""Client connections: at most --max-connections open, each given --header-timeout to send a
request's line and headers. aiohttp's own handler speaks HTTP inside each; this wraps it."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import ssl
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web

from .metrics import Metrics

log = logging.getLogger(__name__)

Handler = Any  # aiohttp's RequestHandler (web_protocol), made by the runner's web.Server
# A connection beyond the limit gets this long to send its request's head: a liveness probe
# (kgpool's /healthz) is answered 200, anything else 503. Then it has REFUSED_LINGER to close
# its side, so that request bytes still unread do not turn our close into a reset that could
# eat the answer.
REFUSED_HEAD_WAIT = 1.0
REFUSED_HEAD_MAX = 8192
REFUSED_LINGER = 2.0
WARN_EVERY = 10.0


# Descriptors kgpool needs beside client connections: its own, and a dozen per kernel
# (ZMQ sockets, pipes, pidfd) for a few dozen kernels.
SPARE_DESCRIPTORS = 512


def ensure_descriptors(max_connections: int) -> str | None:
    """Raise the soft RLIMIT_NOFILE so that --max-connections fits (up to the hard limit, as
    any process may); a warning when it cannot. Running out would fail accepts and kernel
    starts alike."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + SPARE_DESCRIPTORS if max_connections else soft
    if want <= soft or soft == resource.RLIM_INFINITY:
        return None
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError):
        new = soft
    if new < want:
        return (f"--max-connections {max_connections} needs about {want} descriptors, but "
                f"the limit is {new} (ulimit -n): lower it, or raise the limit")
    return None


def raw_answer(status: int, document: dict[str, str], *headers: str) -> bytes:
    """A whole HTTP/1.1 answer with a JSON body, for where aiohttp is not involved."""
    body = json.dumps(document).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            "Content-Type: application/json; charset=utf-8", f"Content-Length: {len(body)}",
            "Connection: close", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def raw_error(status: int, error: str, message: str, *headers: str) -> bytes:
    """kgpool's JSON error, as error_response writes it."""
    return raw_answer(status, {"error": error, "message": message,
                               "reason": HTTPStatus(status).phrase}, *headers)


class Connection(asyncio.Protocol):
    """One client connection: aiohttp's handler inside once admitted, and a deadline on each
    request's head. Phases: head (waiting for a request line and headers), request (the app
    is handling one), idle (answered; aiohttp's keep-alive timeout applies)."""

    def __init__(self, owner: Connections) -> None:
        self._owner = owner
        self.handler: Handler | None = None
        self.transport: asyncio.Transport | None = None
        self.phase = "head"
        self.idle_since = 0.0
        self._bytes = False  # some of the awaited head has arrived
        self._head_since = 0.0  # loop time the awaited head began
        self._timer: asyncio.TimerHandle | None = None
        self._on_lost: Callable[[], object] | None = None  # the request in progress's
        self._head: bytes | None = None  # refused: what came of its request so far

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self._owner.admit(self):
            self._owner.refuse(self)
            return
        self.handler = self._owner.new_handler()
        self.handler.connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self.handler is None:
            self._refused_data(data)
            return
        if self.phase == "idle":
            self._await_head()
        self._bytes = self._bytes or bool(data)
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        if self.handler is None:  # refused: a client done sending gets its answer now
            if self._head is not None:
                self._answer()
            return None
        return self.handler.eof_received()

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._owner.forget(self)
        if self.handler is not None:
            self.handler.connection_lost(exc)
        self.transport = None
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost()

    def request_started(self, on_lost: Callable[[], object] | None = None) -> None:
        """A request's head has arrived; `on_lost` is called if the client goes away before
        request_ended()."""
        self.phase = "request"
        self._on_lost = on_lost

    def request_ended(self) -> None:
        self.phase = "idle"
        self._on_lost = None
        self.idle_since = time.monotonic()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _await_head(self) -> None:
        """The head phase begins. Its deadline is checked lazily: a timer armed once serves
        every request that comes while it runs (none is armed and cancelled per request)."""
        self.phase = "head"
        self._bytes = False
        timeout = self._owner.header_timeout
        if timeout:
            loop = asyncio.get_running_loop()
            self._head_since = loop.time()
            if self._timer is None:
                self._timer = loop.call_at(self._head_since + timeout, self._head_check)

    def _head_check(self) -> None:
        self._timer = None
        if self.phase != "head" or self.transport is None:
            return  # the next head arms it again
        due = self._head_since + self._owner.header_timeout
        loop = asyncio.get_running_loop()
        if loop.time() < due:
            self._timer = loop.call_at(due, self._head_check)
            return
        self._head_late()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ----- beyond the limit: a quick answer without aiohttp ---------------------------------

    def refuse(self) -> None:
        self._head = b""
        self._timer = asyncio.get_running_loop().call_later(REFUSED_HEAD_WAIT, self._answer)

    def answer_now(self) -> None:
        """503 and close, without waiting for the rest of the request (or the client)."""
        self._disarm()
        self._head = None
        if self.transport is not None:
            self.transport.write(self._owner.full_answer())
            self.transport.close()

    def _refused_data(self, data: bytes) -> None:
        if self._head is None:
            return  # answered: the rest is read and dropped
        self._head += data
        if b"\r\n\r\n" in self._head or len(self._head) >= REFUSED_HEAD_MAX:
            self._answer()

    def _answer(self) -> None:
        self._disarm()
        head, self._head = self._head or b"", None
        if self.transport is None:
            return
        line = head.split(b"\r\n", 1)[0].split(b" ")
        if len(line) == 3 and line[0] in (b"GET", b"HEAD") and \
                self._owner.is_liveness(line[1].decode("latin-1").split("?", 1)[0]):
            self.transport.write(raw_answer(200, {"status": "ok"}))
        else:
            self.transport.write(self._owner.full_answer())
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER, self.close)

    def _head_late(self) -> None:
        assert self.transport is not None
        self._owner.closed("header_timeout")
        if self._bytes:  # a client that started a request learns why it ends
            self.transport.write(raw_error(
                408, "header_timeout", f"the request's line and headers did not arrive within "
                f"{self._owner.header_timeout:g}s"))
        self.transport.close()


class Connections:
    """Every open client connection and the policy over them; `listen` opens the socket, the
    front door tells a connection when its request starts and ends (`of`)."""

    def __init__(self, max_connections: int, header_timeout: float, metrics: Metrics,
                 is_liveness: Callable[[str], bool] = lambda path: False) -> None:
        self.max = max_connections
        self.header_timeout = header_timeout
        self.is_liveness = is_liveness  # a raw request path -> it is kgpool's /healthz
        self._metrics = metrics
        self._open: dict[Connection, None] = {}  # admitted, oldest first
        self._by_transport: dict[Any, Connection] = {}
        self._refused: dict[Connection, None] = {}  # beyond the limit, oldest first
        self._server: asyncio.Server | None = None
        self._runner: web.BaseRunner | None = None
        self._warned = 0.0

    # ----- the socket -----------------------------------------------------------------

    async def listen(self, runner: web.BaseRunner, host: str | None, port: int,
                     ssl_context: ssl.SSLContext | None = None, backlog: int = 128) -> None:
        """Accept connections for the runner's app (in place of aiohttp's TCPSite)."""
        self._runner = runner
        handshake = (self.header_timeout or None) if ssl_context is not None else None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: Connection(self), host, port, ssl=ssl_context, backlog=backlog,
            ssl_handshake_timeout=handshake)

    @property
    def port(self) -> int:
        """The TCP port it listens on (the one the system chose, for port 0)."""
        assert self._server is not None and self._server.sockets, "listen() first"
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop accepting; refused connections close now, admitted ones with the runner."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._refused):
            conn.close()

    def new_handler(self) -> Handler:
        assert self._runner is not None and self._runner.server is not None
        return self._runner.server()

    # ----- admission ------------------------------------------------------------------

    def admit(self, conn: Connection) -> bool:
        if self.max and len(self._open) >= self.max and not self._make_room():
            return False
        self._open[conn] = None
        self._by_transport[conn.transport] = conn
        self._metrics.connections.inc()
        return True

    def _make_room(self) -> bool:
        """Close the keep-alive connection idle the longest (none is mid-answer: see `of`)."""
        idle = [c for c in self._open if c.phase == "idle"]
        for conn in sorted(idle, key=lambda c: c.idle_since)[:1]:
                self.closed("idle")
                self.forget(conn)
                conn.close()
                return True
        return False

    def refuse(self, conn: Connection) -> None:
        """503 within REFUSED_HEAD_WAIT (200 for a liveness probe). Refused connections are
        bounded too: beyond the bound the oldest one goes, so a quick client (a probe) still
        gets its answer while slow ones flood in."""
        self.closed("limit")
        now = time.monotonic()
        if now - self._warned > WARN_EVERY:
            self._warned = now
            log.warning("%d client connections open (--max-connections): refusing new ones "
                        "with 503", len(self._open))
        if len(self._refused) >= max(16, self.max // 4):
            oldest = next(iter(self._refused))
            self._refused.pop(oldest)
            oldest.answer_now()
        self._refused[conn] = None
        conn.refuse()

    def full_answer(self) -> bytes:
        return raw_error(503, "too_many_connections", f"the server has {self.max} connections "
                         "open; retry shortly", "Retry-After: 1")

    def forget(self, conn: Connection) -> None:
        self._refused.pop(conn, None)
        if conn in self._open:
            del self._open[conn]
            self._by_transport.pop(conn.transport, None)
            self._metrics.connections.dec()

    def closed(self, reason: str) -> None:
        self._metrics.connections_closed.labels(reason).inc()

    @property
    def count(self) -> int:
        return len(self._open)

    # ----- requests -------------------------------------------------------------------

    def of(self, request: web.Request) -> Connection | None:
        """The connection a request came on; None for one served by another site (the tests'
        aiohttp client). The front door (kgpool/middleware.py) marks it busy from the start of
        the request until its answer is written, so that making room never cuts one off."""
        return self._by_transport.get(request.transport)
