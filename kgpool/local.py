"""A whole kgpool server on a free 127.0.0.1 port inside the caller's event loop: the app and
runner `kgpool serve` runs, for `kgpool call` and kgpool.testing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from types import TracebackType
from typing import TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry

from .config import Settings
from .errors import ConfigError
from .mounts import Mounts
from .web import CONNECTIONS, MOUNTS, create_app, create_runner

log = logging.getLogger(__name__)
T = TypeVar("T")
HOST = "127.0.0.1"


class LocalServer:
    """`async with LocalServer(settings) as server:` serves settings' notebooks at
    `server.url` once every kernel is warm; on the way out (an exception and a cancellation
    included) every kernel is shut down and kgpool's runtime folder removed.

    Entering raises what `kgpool serve` would refuse to start with: NotebookError or
    ConfigError for a notebook it cannot serve, InitError (or another KgpoolError) when no
    kernel warms, OSError when it cannot listen. settings.host and settings.port are not used:
    the port is one the system picks, so two servers never race for one."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.port = 0
        self._app: web.Application | None = None
        self._runner: web.AppRunner | None = None

    @property
    def origin(self) -> str:
        """`http://127.0.0.1:PORT`."""
        return f"http://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """The server's root, `http://127.0.0.1:PORT` plus --base-url (no trailing slash)."""
        return self.origin + self.settings.prefix

    @property
    def mounts(self) -> Mounts:
        assert self._app is not None, "not started"
        return self._app[MOUNTS]

    async def __aenter__(self) -> LocalServer:
        if self.settings.certfile:
            raise ConfigError("a local server speaks plain HTTP on 127.0.0.1: no --certfile")
        self._app = create_app(self.settings, self.registry)  # refuses bad notebooks at once
        self._runner = create_runner(self._app, self.settings)
        try:
            await self._runner.setup()  # starts the pools' warm-up
            connections = self._app[CONNECTIONS]
            await connections.listen(self._runner, HOST, 0)
            self.port = connections.port
            log.info("listening on %s/, warming %s", self.url, ", ".join(
                f"{m.spec.kernels} kernel(s) for {m.spec.path}" for m in self.mounts.all))
            await self.mounts.warmed()
        except BaseException:
            await finish(self.close())
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await finish(self.close())

    @property
    def closing(self) -> bool:
        """close() has begun (or the server never started)."""
        return self._app is None

    async def close(self) -> None:
        """Stop every pool, then the listener and the runner; safe to call twice."""
        app, runner, self._app, self._runner = self._app, self._runner, None, None
        if app is None or runner is None:
            return
        try:
            await app[MOUNTS].close()
        finally:
            await app[CONNECTIONS].close()
            await runner.cleanup()


async def finish(work: Awaitable[T]) -> T:
    """Await `work` to its end even if the caller is cancelled meanwhile (kernels must not be
    left running because a test timed out); the cancellation is raised afterwards."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = cancelled or not task.done()
    if cancelled:
        task.result()  # its own error first, if it had one
        raise asyncio.CancelledError
    return task.result()
