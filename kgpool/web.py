"""aiohttp only: HTTP in, Reply out; the one place where errors become status codes."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .config import Settings
from .connections import Connections
from .cookies import BrowserCookie
from .errors import (
    BatchError,
    ConfigError,
    EndpointRemoved,
    ExecutionError,
    ExecutionTimeout,
    KernelDied,
    KernelError,
    PoolClosed,
    PoolUnavailable,
    QueueFull,
    ResponseInfoError,
    ResponseTooLarge,
)
from .index import render_index
from .metrics import Metrics
from .middleware import (
    AUTHORIZED,
    CALL,
    NOTEBOOK,
    ROUTE,
    STATIC_PREFIX,
    FrontDoor,
    Handler,
    Locator,
    error_response,
)
from .mounts import Mount, Mounts, mount_specs
from .notebook import Notebook
from .replies import ANSI, traceback_text
from .requests import RequestData
from .specs import openapi, swagger
from .streams import Writer

log = logging.getLogger(__name__)

MOUNTS = web.AppKey("mounts", Mounts)
CONNECTIONS = web.AppKey("connections", Connections)
RETRY_AFTER = "1"
# after an early answer (408, 413), unread body bytes are drained this long so that the client
# sees the answer, not a reset
LINGER = 2.0
SOURCE_PATH = "/_api/source"



# Exception type -> (status, error code, extra headers); the first matching type wins.
# (ExecutionError and KernelDied are answered by describe() itself.)
_STATUS_TABLE: tuple[tuple[type[BaseException], int, str, dict[str, str]], ...] = (
    (ResponseInfoError, 500, "bad_response_info", {}),
    (ResponseTooLarge, 500, "response_too_large", {}),
    (BatchError, 500, "batch_answers", {}),
    (EndpointRemoved, 404, "not_found", {}),
    (ExecutionTimeout, 504, "timeout", {}),
    (QueueFull, 503, "queue_full", {"Retry-After": RETRY_AFTER}),
    (PoolClosed, 503, "draining", {"Retry-After": RETRY_AFTER}),
    (PoolUnavailable, 503, "not_ready", {"Retry-After": "5"}),
    (KernelError, 502, "kernel_error", {}),
)
REJECTIONS = frozenset({"queue_full", "draining", "not_ready"})


def describe(exc: BaseException, details: bool = False) -> tuple[int, str, str, dict[str, str]]:
    """(status, error, message, headers) for an exception from the service; others re-raise.
    Warm-up failures quote init cells: their text only with `details` (the request presented
    the valid token), else the server log has it."""
    if isinstance(exc, ExecutionError):
        return 500, exc.ename, exc.evalue, {}
    if isinstance(exc, KernelDied):
        return 502, "kernel_died", ("the kernel running this request died; it is being "
                                    "replaced"), {}
    for kind, status, error, headers in _STATUS_TABLE:
        if isinstance(exc, kind):
            message = str(exc) if details or kind is not PoolUnavailable else WARM_UP_HIDDEN
            return status, error, message, headers
    raise exc


WARM_UP_HIDDEN = "no kernel is warm and warm-ups keep failing; the server log has the reason"
_SLOT = re.compile(r"slot \d+(?=: )")


def redacted_failure(text: str) -> str:
    """A warm-up failure without the init cell's code or exception: which slot, no more."""
    slot = _SLOT.match(text)
    return (f"{slot.group(0)}: " if slot else "") + "warm-up failed; the server log has the reason"


class NotebookHandler:
    """Every path that is not kgpool's own goes to the endpoint of the notebook mounted there."""

    def __init__(self, mounts: Mounts, settings: Settings) -> None:
        self.mounts = mounts
        self.max_body = settings.max_body_size
        self.hide_token = bool(settings.auth_token)  # the token is kgpool's, not the notebook's
        self.cookie = BrowserCookie.for_token(settings.auth_token, settings.prefix) \
            if settings.auth_token else None
        self.expose_traceback = settings.expose_traceback

    async def handle(self, request: web.Request, raw_path: str) -> web.StreamResponse:
        try:
            found = self.mounts.match(raw_path)
        except UnicodeDecodeError:
            return error_response(400, "bad_path", "the path is not valid percent-encoded UTF-8")
        if found is None:
            request[ROUTE] = "unmatched"
            return error_response(404, "not_found", f"no endpoint at {request.path}")
        mount, route, params = found
        request[NOTEBOOK], request[ROUTE] = mount.name, route.path
        endpoint = route.endpoints.get(request.method)
        if endpoint is None and request.method == "OPTIONS":  # as Kernel Gateway: no kernel
            return web.Response(status=200, headers={"Allow": ", ".join(route.allowed)})
        if endpoint is None:
            allow = ", ".join(route.allowed)
            return error_response(405, "method_not_allowed",
                                  f"{request.method} is not defined for {route.path}; "
                                  f"allowed: {allow}", {"Allow": allow})
        if (request.content_length or 0) > self.max_body:
            return error_response(413, "payload_too_large",
                                  f"the body is larger than {self.max_body} bytes")
        query = parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True,
                          errors="surrogateescape")
        data = RequestData(
            body=await request.read(),  # all of it, before a kernel is leased
            content_type=request.headers.get("Content-Type", ""),
            query=tuple((k, v) for k, v in query if not (self.hide_token and k == "token")),
            params=params,
            headers=self.visible_headers(request))
        if endpoint.stream is not None:
            parts = mount.service.stream(endpoint, data, request[CALL])
            return await Writer(request, endpoint.stream).send(
                parts, lambda exc: self.error(mount, exc, request))
        try:
            reply = await mount.service.call(endpoint, data, request[CALL])
        except Exception as exc:
            return self.error(mount, exc, request)[0]
        if request.method == "GET" and reply.status == 200 and \
                not any(name.lower() == "etag" for name in reply.headers):
            return await _with_etag(request, reply.headers, reply.body)
        return web.Response(status=reply.status, headers=reply.headers, body=reply.body)

    def visible_headers(self, request: web.Request) -> tuple[tuple[str, str], ...]:
        """The request's headers as the notebook sees them: with a token configured, without
        Authorization and without kgpool's cookie (a Cookie header left empty is dropped)."""
        if self.cookie is None:
            return tuple(request.headers.items())
        shown = []
        for name, value in request.headers.items():
            if name.lower() == "authorization":
                continue
            if name.lower() == "cookie":
                value = self.cookie.removed_from(value)
                if not value:
                    continue
            shown.append((name, value))
        return tuple(shown)

    def error(self, mount: Mount, exc: BaseException,
              request: web.Request) -> tuple[web.Response, dict[str, Any]]:
        """The answer for a failed request, and its JSON body; a cell's failure is logged with
        its traceback."""
        if isinstance(exc, ExecutionError):
            log_cell_error(request, exc)
        status, error, message, headers = describe(exc, details=self.hide_token)
        if error in REJECTIONS:
            mount.service.metrics.rejected_request(error)
        body: dict[str, Any] = {"error": error, "message": message}
        if self.expose_traceback and isinstance(exc, ExecutionError):
            body["traceback"] = [ANSI.sub("", line) for line in exc.traceback]
        return error_response(status, error, message, headers,
                              **{k: v for k, v in body.items() if k == "traceback"}), body


cell_log = logging.getLogger("kgpool.cells")
_REPEAT_WINDOW = 60.0  # seconds: the same traceback again within it is logged by reference
_RECENT: collections.OrderedDict[str, tuple[float, str]] = collections.OrderedDict()


def log_cell_error(request: web.Request, exc: ExecutionError) -> None:
    """A warning naming the request, its id and the cell, with the cell's traceback as a
    notebook would show it (kgpool's own frames hidden, without colours). Every failure is
    logged; a traceback the log showed in the last minute is named, not repeated, so that a
    client hammering a broken endpoint cannot flood the log with copies."""
    request_id = request[CALL].request_id
    text = traceback_text(exc)
    key = hashlib.sha1(f"{exc.cell}\0{text}".encode("utf-8", "replace"),
                       usedforsecurity=False).hexdigest()
    now = time.monotonic()
    seen = _RECENT.get(key)
    if seen is not None and now - seen[0] < _REPEAT_WINDOW:
        text = f" (the traceback logged for request {seen[1]})"
    else:
        _RECENT[key] = (now, request_id)
        _RECENT.move_to_end(key)
        while len(_RECENT) > 256:
            _RECENT.popitem(last=False)
    cell_log.warning(
        "%s %s (request %s): %s raised %s: %s%s", request.method, request.path, request_id,
        exc.cell or "the cell", exc.ename, exc.evalue, text,
        extra={"request_id": request_id, "cell": exc.cell, "ename": exc.ename})


async def _with_etag(request: web.Request, headers: dict[str, str],
                     body: bytes) -> web.Response:
    """Kernel Gateway's (tornado's) validator on a GET 200 that set none: an Etag of the body,
    and 304 without it when the client's If-None-Match already has that one."""
    digest = hashlib.sha1(usedforsecurity=False)
    if len(body) < 1 << 20:
        digest.update(body)
    else:  # hashlib lets go of the GIL: a large body is hashed beside the event loop
        await asyncio.to_thread(digest.update, body)
    etag = f'"{digest.hexdigest()}"'
    given = request.headers.get("If-None-Match", "")
    if given and (given.strip() == "*" or etag in
                  {tag.strip().removeprefix("W/") for tag in given.split(",")}):
        return web.Response(status=304, headers={"Etag": etag})
    return web.Response(status=200, headers={**headers, "Etag": etag}, body=body)


class OpsHandlers:
    """Health, readiness, metrics and specs: never queued behind kernels."""

    def __init__(self, mounts: Mounts, registry: CollectorRegistry, base: str) -> None:
        self.mounts = mounts
        self.registry = registry
        self.base = base

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Pool state for probes; the reasons of failed warm-ups and reloads (init cells'
        code and exceptions) only for a request that presented the valid token."""
        ready = self.mounts.ready
        details = request.get(AUTHORIZED, False)
        notebooks: dict[str, dict[str, Any]] = {}
        for mount in self.mounts.all:
            status = mount.service.status()
            reload_error = mount.reload_error
            if reload_error is not None and not details:
                reload_error = "the new version was refused; the server log has the reason"
            notebooks[mount.name] = {
                "prefix": mount.prefix or "/", "ready": mount.service.ready,
                "kernels": {"desired": status.desired, "idle": status.idle,
                            "busy": status.busy, "starting": status.starting},
                "queued": status.queued,
                "failing": [f if details else redacted_failure(f) for f in status.failing],
                "reload_error": reload_error}
        total = {key: sum(n["kernels"][key] for n in notebooks.values())
                 for key in ("desired", "idle", "busy", "starting")}
        body = {"status": "ready" if ready else "not ready", "kernels": total,
                "queued": sum(n["queued"] for n in notebooks.values()),
                "draining": any(m.service.status().draining for m in self.mounts.all),
                "failing": [f for n in notebooks.values() for f in n["failing"]],
                "notebooks": notebooks}
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _served(self) -> list[tuple[str, Notebook]]:
        return [(m.prefix, m.service.notebook) for m in self.mounts.all]

    async def swagger(self, request: web.Request) -> web.Response:
        return web.json_response(swagger(self._served()))

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi(self._served(), self.base))


class Site:
    """The one route: kgpool's own paths (under base_url, and under /_kgpool when a notebook
    takes one), /public files, notebook sources, the index page, and the notebooks."""

    def __init__(self, settings: Settings, mounts: Mounts, registry: CollectorRegistry) -> None:
        ops = OpsHandlers(mounts, registry, settings.prefix)
        self.ops: dict[str, Handler] = {
            "/healthz": ops.healthz, "/readyz": ops.readyz, "/metrics": ops.metrics,
            "/_api/spec/swagger.json": ops.swagger, "/_api/spec/openapi.json": ops.openapi}
        self.mounts = mounts
        self.locate = Locator(settings, mounts)
        self.notebooks = NotebookHandler(mounts, settings)
        self.static = Path(settings.static_path).resolve() if settings.static_path else None
        self.download = settings.allow_notebook_download

    async def handle(self, request: web.Request) -> web.StreamResponse:
        where = self.locate(request)
        rel = where.rel
        if rel is None:
            request[ROUTE] = "unmatched"
            return error_response(404, "not_found", f"no endpoint at {request.path}")
        if where.op is not None:
            if request.method not in ("GET", "HEAD"):
                return error_response(405, "method_not_allowed", f"{request.method} is not "
                                      f"defined for {where.op}; allowed: GET", {"Allow": "GET"})
            return await self.ops[where.op](request)
        if self.static is not None and where.static:
            request[ROUTE] = "/public"
            return static_file(self.static, rel[len(STATIC_PREFIX):])
        if self.download and rel.endswith(SOURCE_PATH) and request.method in ("GET", "HEAD"):
            mount = next((m for m in self.mounts.all if m.prefix + SOURCE_PATH == rel), None)
            if mount is not None:
                request[NOTEBOOK], request[ROUTE] = mount.name, SOURCE_PATH
                return web.Response(body=mount.service.notebook.raw,
                                    content_type="application/octet-stream")
        if rel == "/" and request.method == "GET" and self.mounts.route_of("/") is None:
            request[ROUTE] = "/"
            return index_page(self.mounts, details=request.get(AUTHORIZED, False))
        return await self.notebooks.handle(request, rel)


def static_file(root: Path, name: str) -> web.StreamResponse:
    """A file under root (never outside it: no `..`, no symlink out); 403 for a folder."""
    if "\0" in name:
        raise web.HTTPNotFound()
    target = (root / unquote(name)).resolve()
    if target != root and root not in target.parents:
        raise web.HTTPNotFound()
    if target.is_dir():
        raise web.HTTPForbidden()
    if not target.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(target)


def index_page(mounts: Mounts, details: bool = False) -> web.Response:
    """The index; the notebooks' warnings quote cells, so their text only with `details`."""
    return web.Response(text=render_index([(m.name, m.prefix, m.service.notebook)
                                           for m in mounts.all], details),
                        content_type="text/html")


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> web.Application:
    """The whole HTTP application; pools warm in the background once the app starts.

    Raises NotebookError or ConfigError at once for a notebook that cannot be served."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry, timeout=settings.request_timeout)
    mounts = Mounts(mount_specs(settings), settings, metrics)
    if settings.static_path and not Path(settings.static_path).is_dir():
        raise ConfigError(f"--static-path {settings.static_path}: not a folder")
    locate = Locator(settings, mounts)
    connections = Connections(settings.max_connections, settings.header_timeout, metrics,
                              lambda path: locate.op_at(path) == "/healthz")
    app = web.Application(client_max_size=settings.max_body_size)  # no middlewares: FrontDoor
    app[MOUNTS] = mounts
    app[CONNECTIONS] = connections
    front = FrontDoor(settings, metrics, mounts, connections, locate,
                      Site(settings, mounts, registry).handle)
    app.router.add_route("*", "/{tail:.*}", front.handle)

    async def pools(app: web.Application) -> Any:
        mounts.begin()
        watcher = asyncio.ensure_future(mounts.watch()) if settings.reload else None
        probe = asyncio.ensure_future(metrics.probe_loop())
        yield
        probe.cancel()
        if watcher is not None:
            watcher.cancel()
        await mounts.close()

    app.cleanup_ctx.append(pools)
    return app


def create_runner(app: web.Application, settings: Settings) -> web.AppRunner:
    """The runner every kgpool server uses (`serve`, `call`, kgpool.testing): kgpool installs
    its own signal handlers and access log, listens through `Connections`, and cancels a
    request whose client left itself (FrontDoor: not while it holds a kernel)."""
    return web.AppRunner(app, handle_signals=False, access_log=None,
                         handler_cancellation=False, shutdown_timeout=2.0,
                         keepalive_timeout=settings.keepalive_timeout, lingering_time=LINGER)
