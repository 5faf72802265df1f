"""aiohttp only: HTTP in, Reply out; the one place where errors become status codes."""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .config import Settings
from .errors import (
    ExecutionError, ExecutionTimeout, KernelDied, KernelError, PoolClosed, PoolUnavailable,
    QueueFull, ResponseInfoError,
)
from .metrics import Metrics
from .middleware import CALL, ROUTE, error_response, middlewares
from .notebook import Notebook, RequestData, Router, openapi, swagger
from .service import NotebookService

log = logging.getLogger(__name__)

SERVICE = web.AppKey("service", NotebookService)
RETRY_AFTER = "1"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


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

    def __init__(self, service: NotebookService, settings: Settings) -> None:
        self.service = service
        self.router = Router(service.notebook.endpoints)
        self.max_body = settings.max_body_size
        self.hide_authorization = bool(settings.auth_token)
        self.expose_traceback = settings.expose_traceback

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
        if (request.content_length or 0) > self.max_body:
            return error_response(413, "payload_too_large",
                                  f"the body is larger than {self.max_body} bytes")
        headers = request.headers.items()
        if self.hide_authorization:  # the token is kgpool's business, not the notebook's
            headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
        data = RequestData(
            body=await request.read(),  # all of it, before a kernel is leased
            content_type=request.headers.get("Content-Type", ""),
            query=tuple(parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True,
                                  errors="surrogateescape")),
            params=params,
            headers=tuple(headers))
        info = request[CALL]
        try:
            reply = await self.service.call(endpoint, data, info)
        except Exception as exc:
            status, error, message, headers = describe(exc)
            if error in REJECTIONS:
                self.service.metrics.rejected_request(error)
            if self.expose_traceback and isinstance(exc, ExecutionError):
                return web.json_response({"error": error, "message": message, "traceback": [
                    _ANSI.sub("", line) for line in exc.traceback]}, status=500)
            return error_response(status, error, message, headers)
        return web.Response(status=reply.status, headers=reply.headers, body=reply.body)


class OpsHandlers:
    """Health, readiness, metrics and spec: never queued behind kernels."""

    def __init__(self, service: NotebookService, registry: CollectorRegistry,
                 notebook: Notebook) -> None:
        self.service = service
        self.registry = registry
        self.spec = json.dumps(swagger(notebook))
        self.openapi_spec = json.dumps(openapi(notebook))

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

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(text=self.openapi_spec, content_type="application/json")


def create_app(settings: Settings, notebook: Notebook,
               registry: CollectorRegistry | None = None) -> web.Application:
    """The whole HTTP application; the pool warms in the background once the app starts."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry, timeout=settings.request_timeout, max_queue=settings.max_queue)
    service = NotebookService(notebook, settings, metrics)
    app = web.Application(middlewares=middlewares(settings, metrics),
                          client_max_size=settings.max_body_size)
    app[SERVICE] = service
    ops = OpsHandlers(service, registry, notebook)
    app.router.add_get("/healthz", ops.healthz)
    app.router.add_get("/readyz", ops.readyz)
    app.router.add_get("/metrics", ops.metrics)
    app.router.add_get("/_api/spec/swagger.json", ops.swagger)
    app.router.add_get("/_api/spec/openapi.json", ops.openapi)
    app.router.add_route("*", "/{tail:.*}", NotebookHandler(service, settings).handle)

    async def pool_ctx(app: web.Application) -> Any:
        service.begin()
        yield
        await service.close()

    app.cleanup_ctx.append(pool_ctx)
    return app
