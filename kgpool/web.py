"""aiohttp only: HTTP in, Reply out; the one place where errors become status codes."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .config import Settings
from .errors import (
    ExecutionError, ExecutionTimeout, KernelDied, KernelError, PoolClosed, PoolUnavailable,
    QueueFull, ResponseInfoError,
)
from .metrics import Metrics
from .notebook import Notebook, RequestData, Router, swagger
from .service import CallInfo, NotebookService

log = logging.getLogger(__name__)
access_log = logging.getLogger("kgpool.access")

SERVICE = web.AppKey("service", NotebookService)
CALL = web.RequestKey("call", CallInfo)
ROUTE = web.RequestKey("route", str)
RETRY_AFTER = "1"
OPS_PATHS = ("/healthz", "/readyz", "/metrics", "/_api/spec/swagger.json")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, error: str, message: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": error, "message": message}, status=status,
                             headers=headers)


# Exception type -> (status, error code, extra headers); the first matching type wins.
_STATUS_TABLE: tuple[tuple[type[BaseException], int, str, dict[str, str]], ...] = (
    (ExecutionError, 500, "", {}),
    (ResponseInfoError, 500, "bad_response_info", {}),
    (ExecutionTimeout, 504, "timeout", {}),
    (KernelDied, 502, "kernel_died", {}),
    (QueueFull, 503, "queue_full", {"Retry-After": RETRY_AFTER}),
    (PoolClosed, 503, "draining", {"Retry-After": RETRY_AFTER}),
    (PoolUnavailable, 503, "not_ready", {"Retry-After": "5"}),
    (KernelError, 502, "kernel_error", {}),
)
REJECTIONS = frozenset({"queue_full", "draining", "not_ready"})


def describe(exc: BaseException) -> tuple[int, str, str, dict[str, str]]:
    """(status, error, message, headers) for an exception from the service; others re-raise."""
    if isinstance(exc, ExecutionError):
        return 500, exc.ename, exc.evalue, {}
    if isinstance(exc, KernelDied):
        return 502, "kernel_died", "the kernel running this request died; it is being " \
            "replaced", {}
    for kind, status, error, headers in _STATUS_TABLE:
        if isinstance(exc, kind):
            return status, error, str(exc), headers
    raise exc


class NotebookHandler:
    """Routes every non-operational path to the notebook's endpoints."""

    def __init__(self, service: NotebookService) -> None:
        self.service = service
        self.router = Router(service.notebook.endpoints)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            found = self.router.match(request.rel_url.raw_path)
        except UnicodeDecodeError:
            return error_response(400, "bad_path", "the path is not valid percent-encoded UTF-8")
        if found is None:
            request[ROUTE] = "unmatched"
            return error_response(404, "not_found", f"no endpoint at {request.path}")
        route, params = found
        request[ROUTE] = route.path
        endpoint = route.endpoints.get(request.method)
        if endpoint is None:
            allow = ", ".join(route.allowed)
            return error_response(405, "method_not_allowed",
                                  f"{request.method} is not defined for {route.path}; "
                                  f"allowed: {allow}", {"Allow": allow})
        data = RequestData(
            body=await request.read(),
            content_type=request.headers.get("Content-Type", ""),
            query=tuple(request.rel_url.query.items()),
            params=params,
            headers=tuple(request.headers.items()))
        info = request[CALL]
        try:
            reply = await self.service.call(endpoint, data, info)
        except Exception as exc:
            status, error, message, headers = describe(exc)
            if error in REJECTIONS:
                self.service.metrics.rejected_request(error)
            return error_response(status, error, message, headers)
        return web.Response(status=reply.status, headers=reply.headers, body=reply.body)


def access_middleware(metrics: Metrics) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex
        request[CALL] = info = CallInfo()
        ops = request.path in OPS_PATHS
        if not ops:
            metrics.in_flight.inc()
        status = 500
        try:
            response = await handler(request)
            status = response.status
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            elapsed = time.monotonic() - started
            route = request.get(ROUTE, request.path if ops else "unmatched")
            if not ops:
                metrics.in_flight.dec()
                metrics.answered(route, request.method, status, elapsed)
            access_log.info(
                "%s %s %d %.1fms route=%s queue=%.1fms slot=%s id=%s", request.method,
                request.path_qs, status, elapsed * 1000, route, info.queue_wait * 1000,
                info.slot, request_id,
                extra={"request_id": request_id, "method": request.method, "route": route,
                       "path": request.path, "status": status,
                       "duration_ms": round(elapsed * 1000, 3),
                       "queue_wait_ms": round(info.queue_wait * 1000, 3),
                       "kernel_slot": info.slot, "kernel_pid": info.kernel_pid})
        response.headers["X-Request-ID"] = request_id
        return response
    return middleware


class OpsHandlers:
    """Health, readiness, metrics and spec: never queued behind kernels."""

    def __init__(self, service: NotebookService, registry: CollectorRegistry,
                 notebook: Notebook) -> None:
        self.service = service
        self.registry = registry
        self.spec = json.dumps(swagger(notebook))

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        status = self.service.status()
        body = {"status": "ready" if self.service.ready else "not ready",
                "kernels": {"desired": status.desired, "idle": status.idle,
                            "busy": status.busy, "starting": status.starting},
                "queued": status.queued, "draining": status.draining,
                "failing": list(status.failing)}
        return web.json_response(body, status=200 if self.service.ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def swagger(self, request: web.Request) -> web.Response:
        return web.Response(text=self.spec, content_type="application/json")


def create_app(settings: Settings, notebook: Notebook,
               registry: CollectorRegistry | None = None) -> web.Application:
    """The whole HTTP application; the pool warms in the background once the app starts."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry, timeout=settings.request_timeout, max_queue=settings.max_queue)
    service = NotebookService(notebook, settings, metrics)
    app = web.Application(middlewares=[access_middleware(metrics)],
                          client_max_size=1024**3)
    app[SERVICE] = service
    ops = OpsHandlers(service, registry, notebook)
    app.router.add_get("/healthz", ops.healthz)
    app.router.add_get("/readyz", ops.readyz)
    app.router.add_get("/metrics", ops.metrics)
    app.router.add_get("/_api/spec/swagger.json", ops.swagger)
    app.router.add_route("*", "/{tail:.*}", NotebookHandler(service).handle)

    async def pool_ctx(app: web.Application) -> Any:
        service.begin()
        yield
        await service.close()

    app.cleanup_ctx.append(pool_ctx)
    return app
