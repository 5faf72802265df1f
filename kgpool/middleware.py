"""The front door: access log and metrics, CORS, JSON errors, auth and the body deadline, in
one pass around the site's handler."""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web

from .config import Settings
from .connections import Connection, Connections
from .cookies import BrowserCookie, navigation, trusted_use, without_token
from .logs import RecordMaker
from .metrics import Metrics
from .mounts import Mounts
from .service import CallInfo

log = logging.getLogger(__name__)
access_log = logging.getLogger("kgpool.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CALL = web.RequestKey("call", CallInfo)
ROUTE = web.RequestKey("route", str)
NOTEBOOK = web.RequestKey("notebook", str)
# The request presented the valid token (only ever True when a token is configured): what
# may see init-cell errors and notebook warnings, which quote the notebook's code.
AUTHORIZED = web.RequestKey("authorized", bool)
PROBES = frozenset({"/healthz", "/readyz"})
STATIC_PREFIX = "/public/"
CLIENT_CLOSED = 499  # nginx's code for a client that closed the connection before the answer


@dataclass(frozen=True, slots=True)
class Where:
    """Where a request goes: its path below base_url (None outside it) and the kgpool path it
    reaches (None for a notebook's)."""

    rel: str | None
    op: str | None

    @property
    def static(self) -> bool:
        return self.rel is not None and self.rel.startswith(STATIC_PREFIX)


WHERE = web.RequestKey("where", Where)


class Locator:
    """Decides, once per request, which paths are kgpool's and which a notebook's."""

    def __init__(self, settings: Settings, mounts: Mounts) -> None:
        self.base = settings.prefix
        self.mounts = mounts

    def __call__(self, request: web.Request) -> Where:
        found = request.get(WHERE)
        if found is None:
            found = request[WHERE] = self.where(request.rel_url.raw_path)
        return found

    def where(self, raw: str) -> Where:
        rel: str | None = raw
        if self.base:
            rel = raw[len(self.base):] or "/" if raw == self.base or \
                raw.startswith(self.base + "/") else None
        return Where(rel, self.mounts.kgpool_path(rel) if rel is not None else None)

    def op_at(self, raw: str) -> str | None:
        """Which of kgpool's own paths a raw request path (no query) reaches, if any."""
        return self.where(raw).op


def error_response(status: int, error: str, message: str,
                   headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    """Every error kgpool writes: `error` and `message`, and Kernel Gateway's `reason`."""
    return web.json_response({"error": error, "message": message,
                              "reason": _reason(status), **extra},
                             status=status, headers=headers)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def client_address(request: web.Request, trust_xheaders: bool) -> str:
    """The client's address; behind a trusted proxy, the one it forwarded."""
    if trust_xheaders:
        forwarded = request.headers.get("X-Forwarded-For") or request.headers.get("X-Real-IP")
        if forwarded:
            return forwarded.split(",", 1)[0].strip()[:64]
    return request.remote or ""


def new_request_id() -> str:
    """An id for a request that brought none: 128 random bits as hex, as uuid4().hex reads
    (ids tell requests apart in logs; they guard nothing, so no system entropy per request)."""
    return f"{random.getrandbits(128):032x}"


def _given_id(value: str) -> bool:
    return 0 < len(value) <= 128 and value.isascii() and value.isprintable()


_access_record = RecordMaker(access_log, __file__)


def log_access(request: web.Request, level: int, status: int, elapsed: float, route: str,
               info: CallInfo, remote: str) -> None:
    """The access log's line for one request, every field also as a record attribute."""
    method, request_id = request.method, info.request_id
    record = _access_record(
        level, "%s %s %d %.1fms route=%s queue=%.1fms slot=%s remote=%s id=%s%s",
        (method, request.path, status, elapsed * 1000, route, info.queue_wait * 1000,
         info.slot, remote, request_id, f" batch={info.batch}" if info.batch else ""),
        {"request_id": request_id, "method": method, "route": route,
         "notebook": request.get(NOTEBOOK, ""), "remote": remote, "status": status,
         "duration_ms": round(elapsed * 1000, 3),
         "queue_wait_ms": round(info.queue_wait * 1000, 3), "kernel_slot": info.slot,
         "kernel_pid": info.kernel_pid, "batch": info.batch})
    access_log.handle(record)


class Auth:
    """Bearer (or Kernel Gateway's `token` scheme or `?token=`) authentication, and for
    browsers the cookie a `?token=` is swapped for (kgpool/cookies.py); probes and /public
    stay open."""

    def __init__(self, settings: Settings, locate: Locator, mounts: Mounts) -> None:
        self._token = settings.auth_token.encode("utf-8", "surrogateescape")
        self._cookie = BrowserCookie.for_token(settings.auth_token, settings.prefix)
        self._open_ops = PROBES if settings.metrics_auth else PROBES | {"/metrics"}
        self._open_static = bool(settings.static_path)
        self._trust_xheaders = settings.trust_xheaders
        self._locate = locate
        self._mounts = mounts

    def _valid(self, given: str) -> bool:
        return bool(given) and \
            hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), self._token)

    def _presented(self, request: web.Request, index: bool) -> str | None:
        """How the request presented the token: "header", "query", "cookie", or None."""
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() in ("bearer", "token"):
            return "header" if self._valid(given) else None
        if self._valid(request.query.get("token", "")):  # Kernel Gateway's clients send it
            return "query"
        if self._cookie.presented(request.headers.get("Cookie", "")) and \
                trusted_use(request.method, request.headers, index):
            return "cookie"
        return None

    def check(self, request: web.Request) -> web.Response | None:
        """None to go on (request[AUTHORIZED] says whether the token came), or the answer:
        401, or the 303 that swaps a browser's ?token= for the cookie."""
        where = self._locate(request)
        index = where.rel == "/" and where.op is None and self._mounts.route_of("/") is None
        how = self._presented(request, index)
        request[AUTHORIZED] = how is not None
        if how == "query" and request.method == "GET" and where.rel is not None and (
                index or navigation(request.headers)):
            return swap_for_cookie(request, self._cookie, self._trust_xheaders)
        if how is None and not (where.op in self._open_ops or
                                (where.static and self._open_static)):
            return error_response(401, "unauthorized", "a valid token is required: "
                                  "Authorization: Bearer <token> (in a browser, open the "
                                  "page once with ?token=<token>)",
                                  {"WWW-Authenticate": 'Bearer realm="kgpool"'})
        return None


def swap_for_cookie(request: web.Request, cookie: BrowserCookie,
                    trust_xheaders: bool) -> web.Response:
    """303 to the same URL without `token=`, setting the cookie that stands for it."""
    secure = request.secure or (trust_xheaders and request.headers.get(
        "X-Forwarded-Proto", "").strip().lower() == "https")
    location = without_token(request.rel_url.raw_path, request.rel_url.raw_query_string)
    return web.Response(status=303, headers={
        "Location": location, "Set-Cookie": cookie.header(secure),
        "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


class Cors:
    """CORS for the configured origins; preflights are answered here, without a kernel."""

    def __init__(self, settings: Settings, mounts: Mounts, locate: Locator) -> None:
        self.origins = settings.origins
        self.allow_all = "*" in self.origins
        self._settings = settings
        self._mounts = mounts
        self._locate = locate
        self._base = {"Access-Control-Expose-Headers": settings.expose_headers}
        if settings.allow_credentials:
            self._base["Access-Control-Allow-Credentials"] = "true"
        self._preflight = {"Access-Control-Allow-Methods": settings.allow_methods.upper(),
                           "Access-Control-Allow-Headers": settings.allow_headers,
                           "Access-Control-Max-Age": str(settings.max_age)}

    def allowed(self, origin: str) -> bool:
        return self.allow_all or origin in self.origins

    def headers_for(self, origin: str) -> dict[str, str]:
        return {"Access-Control-Allow-Origin": "*" if self.allow_all and not
                self._settings.allow_credentials else origin, **self._base}

    def preflight(self, request: web.Request, origin: str) -> web.Response:
        rel = self._locate(request).rel
        found = self._mounts.route_of(rel) if rel is not None else None
        if found is not None:
            request[NOTEBOOK], request[ROUTE] = found
        if not self.allowed(origin):
            return error_response(403, "cors_refused", f"origin {origin} may not call this "
                                  "server")
        # Allowed even for an unknown path: the page then gets to read the real 404.
        return web.Response(status=204, headers={**self.headers_for(origin), **self._preflight})


class BodyDeadline:
    """A request for an endpoint gets its body read here, within --body-timeout, or 408 and
    the connection closed: a slow client never gets as far as a kernel, nor holds a task long.
    (Once authenticated: an unauthenticated body is never read.)"""

    def __init__(self, settings: Settings, mounts: Mounts, locate: Locator) -> None:
        self.timeout = settings.body_timeout
        self._max = settings.max_body_size
        self._mounts = mounts
        self._locate = locate

    def _reaches_endpoint(self, request: web.Request) -> bool:
        where = self._locate(request)
        if where.rel is None or where.op is not None:
            return False
        try:
            found = self._mounts.match(where.rel)
        except UnicodeDecodeError:
            return False
        if found is None or request.method not in found[1].endpoints:
            return False
        request[NOTEBOOK], request[ROUTE] = found[0].name, found[1].path  # for a 408's metrics
        return True

    async def read(self, request: web.Request) -> web.Response | None:
        """None once the body is read (aiohttp keeps it: the handler's read() returns it), or
        the 408."""
        if not request.body_exists or (request.content_length or 0) > self._max or \
                not self._reaches_endpoint(request):
            return None
        try:
            async with asyncio.timeout(self.timeout):
                await request.read()
        except TimeoutError:
            response = error_response(408, "body_timeout", "the request body did not "
                                      f"arrive within {self.timeout:g}s")
            response.force_close()  # the rest of the body is not worth waiting for
            return response
        return None


class FrontDoor:
    """The one pass every request makes before and after the site handles it, outermost
    first: the connection is marked busy until its answer is written; an id, one access-log
    line and one metrics sample (operational paths are not counted); CORS; aiohttp's own
    errors as JSON (anything unexpected logged, never shown); auth; the body deadline.

    One coroutine, not a middleware per concern: each aiohttp middleware is another frame
    and partial per request, and that plumbing was a measurable share of a request's cost.

    A client that leaves cancels its request only while the request holds no kernel
    (CallInfo.cancellable): waiting in the queue or for its body, it is dropped at once; once
    a kernel runs its cell, the cell finishes (within the deadline), the kernel goes back
    clean and the request is logged as 499 (aiohttp's own handler cancellation is off)."""

    def __init__(self, settings: Settings, metrics: Metrics, mounts: Mounts,
                 connections: Connections, locate: Locator, handler: Handler) -> None:
        self._locate = locate
        self._metrics = metrics
        self._connections = connections
        self._handler = handler
        self._trust_xheaders = settings.trust_xheaders
        self._cors = Cors(settings, mounts, self._locate) if settings.origins else None
        self._auth = Auth(settings, self._locate, mounts) if settings.auth_token else None
        self._body = BodyDeadline(settings, mounts, self._locate) \
            if settings.body_timeout else None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        conn = self._connections.of(request)
        started = time.monotonic()
        request_id = request.headers.get("X-Request-ID", "")
        if not _given_id(request_id):
            request_id = new_request_id()  # none given, or nothing fit for logs and headers
        request[CALL] = info = CallInfo(request_id=request_id)
        if conn is not None:
            task = asyncio.current_task()
            assert task is not None
            conn.request_started(lambda: info.cancellable and task.cancel())
        try:
            response = await self._logged(request, info, started, conn)
            response.headers["X-Request-ID"] = request_id
            if conn is not None and conn.transport is not None:
                try:
                    await response.prepare(request)
                    await response.write_eof()
                except ConnectionError:
                    pass  # the client left; aiohttp notices it too
            return response
        finally:
            if conn is not None:
                conn.request_ended()

    async def _logged(self, request: web.Request, info: CallInfo, started: float,
                      conn: Connection | None) -> web.StreamResponse:
        metrics = self._metrics
        op = self._locate(request).op
        if op is None:
            metrics.in_flight += 1
        status = 500
        try:
            response = await self._answer(request, conn)
            status = response.status if conn is None or conn.transport is not None \
                else CLIENT_CLOSED  # it left while its cell ran: the answer goes nowhere
            return response
        except asyncio.CancelledError:
            status = CLIENT_CLOSED  # the client went away: not a server error
            raise
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            elapsed = time.monotonic() - started
            route = op or request.get(ROUTE, "unmatched")
            if op is None:
                metrics.in_flight -= 1
                metrics.answered(request.get(NOTEBOOK, ""), route, request.method, status,
                                 elapsed)
            level = logging.DEBUG if op else logging.INFO  # probes and scrapes would drown it
            if access_log.isEnabledFor(level):
                log_access(request, level, status, elapsed, route, info,
                           client_address(request, self._trust_xheaders))

    async def _answer(self, request: web.Request,
                      conn: Connection | None) -> web.StreamResponse:
        cors = self._cors
        if cors is None:
            return await self._checked(request, conn)
        origin = request.headers.get("Origin")
        if origin is not None and request.method == "OPTIONS" and \
                "Access-Control-Request-Method" in request.headers:
            response: web.StreamResponse = cors.preflight(request, origin)
        else:
            response = await self._checked(request, conn)
            if origin is not None and cors.allowed(origin):
                response.headers.update(cors.headers_for(origin))
        if not cors.allow_all:  # the answer depends on the Origin: caches must keep them apart
            response.headers["Vary"] = "Origin"
        return response

    async def _checked(self, request: web.Request,
                       conn: Connection | None) -> web.StreamResponse:
        try:
            if self._auth is not None:
                early = self._auth.check(request)
                if early is not None:
                    return early
            if self._body is not None:
                early = await self._body.read(request)
                if early is not None:
                    return early
            return await self._handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            name = exc.reason.lower().replace(" ", "_")
            headers = {k: v for k, v in exc.headers.items()
                       if k.lower() not in ("content-type", "content-length")}
            return error_response(exc.status, name, exc.text or exc.reason, headers)
        except Exception:
            if conn is None or conn.transport is not None:  # (else: it left; a 499)
                log.exception("unexpected error handling %s %s", request.method,
                              request.path)
            return error_response(500, "internal", "kgpool hit an unexpected error; the server "
                                  "log has the details")
