"""aiohttp middlewares, outermost first: access log and metrics, CORS, JSON errors, auth."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .config import Settings
from .metrics import Metrics
from .mounts import OPS_PATHS
from .service import CallInfo

log = logging.getLogger(__name__)
access_log = logging.getLogger("kgpool.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# raw path -> (notebook name, route template) of the endpoint it would reach, if any
RouteOf = Callable[[str], "tuple[str, str] | None"]
CALL = web.RequestKey("call", CallInfo)
ROUTE = web.RequestKey("route", str)
NOTEBOOK = web.RequestKey("notebook", str)
PROBES = frozenset({"/healthz", "/readyz"})


def error_response(status: int, error: str, message: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": error, "message": message}, status=status,
                             headers=headers)


def access(metrics: Metrics) -> Any:
    """One log line and one metrics sample per request; operational paths are not counted."""
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        request_id = request.headers.get("X-Request-ID", "")
        if not (0 < len(request_id) <= 128 and request_id.isascii() and request_id.isprintable()):
            request_id = uuid.uuid4().hex  # none given, or nothing fit for logs and headers
        request[CALL] = info = CallInfo()
        ops = request.path in OPS_PATHS
        if not ops:
            metrics.in_flight.inc()
        status = 500
        try:
            response = await handler(request)
            status = response.status
        finally:
            elapsed = time.monotonic() - started
            route = request.get(ROUTE, request.path if ops else "unmatched")
            if not ops:
                metrics.in_flight.dec()
                metrics.answered(request.get(NOTEBOOK, ""), route, request.method, status,
                                 elapsed)
            access_log.log(
                logging.DEBUG if ops else logging.INFO,  # probes and scrapes would drown it
                "%s %s %d %.1fms route=%s queue=%.1fms slot=%s id=%s", request.method,
                request.path, status, elapsed * 1000, route, info.queue_wait * 1000,
                info.slot, request_id,
                extra={"request_id": request_id, "method": request.method, "route": route,
                       "notebook": request.get(NOTEBOOK, ""),
                       "status": status, "duration_ms": round(elapsed * 1000, 3),
                       "queue_wait_ms": round(info.queue_wait * 1000, 3),
                       "kernel_slot": info.slot, "kernel_pid": info.kernel_pid})
        response.headers["X-Request-ID"] = request_id
        return response
    return middleware


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


def auth(settings: Settings) -> Any:
    """Bearer (or Kernel Gateway's `token`) authentication; probes stay open."""
    token = settings.auth_token.encode()
    open_paths = PROBES if settings.metrics_auth else PROBES | {"/metrics"}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in open_paths:
            return await handler(request)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() not in ("bearer", "token") or \
                not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token):
            return error_response(401, "unauthorized", "a valid token is required: "
                                  "Authorization: Bearer <token>",
                                  {"WWW-Authenticate": 'Bearer realm="kgpool"'})
        return await handler(request)
    return middleware


def cors(settings: Settings, route_of: RouteOf) -> Any:
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
        found = route_of(request.rel_url.raw_path)
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


def middlewares(settings: Settings, metrics: Metrics, route_of: RouteOf) -> list[Any]:
    stack = [access(metrics)]
    if settings.origins:
        stack.append(cors(settings, route_of))
    stack.append(json_errors)
    if settings.auth_token:
        stack.append(auth(settings))
    return stack
