"""aiohttp middlewares, outermost first: access log and metrics, CORS, JSON errors, auth, and
the body deadline."""

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
from .cookies import BrowserCookie, navigation, trusted_use, without_token
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


def access(metrics: Metrics, locate: Locator, trust_xheaders: bool) -> Any:
    """One log line and one metrics sample per request; operational paths are not counted.
    The line's record is made directly (no caller lookup: the access log's origin is always
    this function) and only when the level lets it through."""
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        request_id = request.headers.get("X-Request-ID", "")
        if not _given_id(request_id):
            request_id = new_request_id()  # none given, or nothing fit for logs and headers
        request[CALL] = info = CallInfo(request_id=request_id)
        op = locate(request).op
        if op is None:
            metrics.in_flight.inc()
        status = 500
        try:
            response = await handler(request)
            status = response.status
        except asyncio.CancelledError:
            status = CLIENT_CLOSED  # the client went away: not a server error
            raise
        finally:
            elapsed = time.monotonic() - started
            route = op or request.get(ROUTE, "unmatched")
            if op is None:
                metrics.in_flight.dec()
                metrics.answered(request.get(NOTEBOOK, ""), route, request.method, status,
                                 elapsed)
            level = logging.DEBUG if op else logging.INFO  # probes and scrapes would drown it
            if access_log.isEnabledFor(level):
                log_access(request, level, status, elapsed, route, info,
                           client_address(request, trust_xheaders))
        response.headers["X-Request-ID"] = request_id
        return response
    return middleware


def log_access(request: web.Request, level: int, status: int, elapsed: float, route: str,
               info: CallInfo, remote: str) -> None:
    """The access log's line for one request, every field also as a record attribute."""
    method, request_id = request.method, info.request_id
    record = access_log.makeRecord(
        access_log.name, level, __file__, 0,
        "%s %s %d %.1fms route=%s queue=%.1fms slot=%s remote=%s id=%s%s",
        (method, request.path, status, elapsed * 1000, route, info.queue_wait * 1000,
         info.slot, remote, request_id, f" batch={info.batch}" if info.batch else ""),
        None, "access",
        {"request_id": request_id, "method": method, "route": route,
         "notebook": request.get(NOTEBOOK, ""), "remote": remote, "status": status,
         "duration_ms": round(elapsed * 1000, 3),
         "queue_wait_ms": round(info.queue_wait * 1000, 3), "kernel_slot": info.slot,
         "kernel_pid": info.kernel_pid, "batch": info.batch})
    access_log.handle(record)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors become JSON; anything unexpected is logged, never shown."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        name = exc.reason.lower().replace(" ", "_")
        headers = {k: v for k, v in exc.headers.items()
                   if k.lower() not in ("content-type", "content-length")}
        return error_response(exc.status, name, exc.text or exc.reason, headers)
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return error_response(500, "internal", "kgpool hit an unexpected error; the server "
                              "log has the details")


def auth(settings: Settings, locate: Locator, mounts: Mounts) -> Any:
    """Bearer (or Kernel Gateway's `token` scheme or `?token=`) authentication, and for
    browsers the cookie a `?token=` is swapped for (kgpool/cookies.py); probes and /public
    stay open."""
    token = settings.auth_token.encode("utf-8", "surrogateescape")
    cookie = BrowserCookie.for_token(settings.auth_token, settings.prefix)
    open_ops = PROBES if settings.metrics_auth else PROBES | {"/metrics"}

    def valid(given: str) -> bool:
        return bool(given) and \
            hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token)

    def presented(request: web.Request, index: bool) -> str | None:
        """How the request presented the token: "header", "query", "cookie", or None."""
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() in ("bearer", "token"):
            return "header" if valid(given) else None
        if valid(request.query.get("token", "")):  # Kernel Gateway's clients may send ?token=
            return "query"
        if cookie.presented(request.headers.get("Cookie", "")) and \
                trusted_use(request.method, request.headers, index):
            return "cookie"
        return None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        where = locate(request)
        index = where.rel == "/" and where.op is None and mounts.route_of("/") is None
        how = presented(request, index)
        request[AUTHORIZED] = how is not None
        if how == "query" and request.method == "GET" and where.rel is not None and (
                index or navigation(request.headers)):
            return swap_for_cookie(request, cookie, settings.trust_xheaders)
        if where.op in open_ops or (where.static and settings.static_path):
            return await handler(request)
        if how is None:
            return error_response(401, "unauthorized", "a valid token is required: "
                                  "Authorization: Bearer <token> (in a browser, open the "
                                  "page once with ?token=<token>)",
                                  {"WWW-Authenticate": 'Bearer realm="kgpool"'})
        return await handler(request)
    return middleware


def swap_for_cookie(request: web.Request, cookie: BrowserCookie,
                    trust_xheaders: bool) -> web.Response:
    """303 to the same URL without `token=`, setting the cookie that stands for it."""
    secure = request.secure or (trust_xheaders and request.headers.get(
        "X-Forwarded-Proto", "").strip().lower() == "https")
    location = without_token(request.rel_url.raw_path, request.rel_url.raw_query_string)
    return web.Response(status=303, headers={
        "Location": location, "Set-Cookie": cookie.header(secure),
        "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


def cors(settings: Settings, mounts: Mounts, locate: Locator) -> Any:
    """CORS for the configured origins; preflights are answered here, without a kernel."""
    origins = settings.origins
    allow_all = "*" in origins
    methods = settings.allow_methods.upper()
    base = {"Access-Control-Expose-Headers": settings.expose_headers}
    if settings.allow_credentials:
        base["Access-Control-Allow-Credentials"] = "true"

    def allowed(origin: str) -> bool:
        return allow_all or origin in origins

    def headers_for(origin: str) -> dict[str, str]:
        return {"Access-Control-Allow-Origin": "*" if allow_all and not
                settings.allow_credentials else origin, **base}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and request.method == "OPTIONS" and \
                "Access-Control-Request-Method" in request.headers:
            response = preflight(request, origin)
        else:
            response = await handler(request)
            if origin is not None and allowed(origin):
                response.headers.update(headers_for(origin))
        if not allow_all:  # the answer depends on the Origin: caches must keep them apart
            response.headers["Vary"] = "Origin"
        return response

    def preflight(request: web.Request, origin: str) -> web.StreamResponse:
        rel = locate(request).rel
        found = mounts.route_of(rel) if rel is not None else None
        if found is not None:
            request[NOTEBOOK], request[ROUTE] = found
        if not allowed(origin):
            return error_response(403, "cors_refused", f"origin {origin} may not call this "
                                  "server")
        # Allowed even for an unknown path: the page then gets to read the real 404.
        return web.Response(status=204, headers={
            **headers_for(origin), "Access-Control-Allow-Methods": methods,
            "Access-Control-Allow-Headers": settings.allow_headers,
            "Access-Control-Max-Age": str(settings.max_age)})
    return middleware


def body_deadline(settings: Settings, mounts: Mounts, locate: Locator) -> Any:
    """A request for an endpoint gets its body read here, within --body-timeout, or 408 and
    the connection closed: a slow client never gets as far as a kernel, nor holds a task long.
    (Once authenticated: an unauthenticated body is never read.)"""
    timeout = settings.body_timeout

    def reaches_endpoint(request: web.Request) -> bool:
        rel = locate(request).rel
        if rel is None or locate(request).op is not None:
            return False
        try:
            found = mounts.match(rel)
        except UnicodeDecodeError:
            return False
        if found is None or request.method not in found[1].endpoints:
            return False
        request[NOTEBOOK], request[ROUTE] = found[0].name, found[1].path  # for a 408's metrics
        return True

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists and (request.content_length or 0) <= settings.max_body_size \
                and reaches_endpoint(request):
            try:
                async with asyncio.timeout(timeout):
                    await request.read()  # kept by aiohttp: the handler's read() returns it
            except TimeoutError:
                response = error_response(408, "body_timeout", "the request body did not "
                                          f"arrive within {timeout:g}s")
                response.force_close()  # the rest of the body is not worth waiting for
                return response
        return await handler(request)
    return middleware


def middlewares(settings: Settings, metrics: Metrics, mounts: Mounts) -> list[Any]:
    locate = Locator(settings, mounts)
    stack = [access(metrics, locate, settings.trust_xheaders)]
    if settings.origins:
        stack.append(cors(settings, mounts, locate))
    stack.append(json_errors)
    if settings.auth_token:
        stack.append(auth(settings, locate, mounts))
    if settings.body_timeout:
        stack.append(body_deadline(settings, mounts, locate))
    return stack
