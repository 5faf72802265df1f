"""Batched endpoints: concurrent requests for one endpoint gathered into one run of its cell.

A batch closes when it holds `max_size` requests or its first request has waited `max_wait`
seconds, whichever comes first; then it goes to any free kernel, and the next batch starts
gathering at once. A request that times out or whose client leaves while its batch is still
gathering just leaves the batch; one whose batch already runs gets its answer dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ExecutionTimeout, QueueFull
from .notebook import Batching
from .replies import Reply


@dataclass(eq=False)
class Item:
    """One request in a batch: its REQUEST document, deadline and the answer to come."""

    document: str
    deadline: float | None
    info: Any  # the service's CallInfo: the access log reads the batch id from it
    future: asyncio.Future[Reply] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


log = logging.getLogger(__name__)
Run = Callable[[str, list[Item]], Awaitable[None]]  # (batch id, its items) -> answers set


class Batcher:
    """Gathers the requests of one batched endpoint and hands each batch to `run`."""

    def __init__(self, batching: Batching, run: Run, bound: int, name: str = "") -> None:
        self.name = name  # for the log: the endpoint
        self.max_size, self.max_wait = batching.max_size, batching.max_wait
        self._run = run
        self._bound = bound  # requests gathering or waiting at most
        self._open: list[Item] = []
        self._timer: asyncio.TimerHandle | None = None
        self._pending = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, document: str, deadline: float | None, info: Any) -> Reply:
        """The request's own answer, once its batch has run."""
        if self._pending >= self._bound:
            raise QueueFull(f"{self._pending} request(s) already waiting in batches")
        item = Item(document, deadline, info)
        self._open.append(item)
        self._pending += 1
        item.future.add_done_callback(self._answered)
        log.debug("%s: a request joins the gathering batch (%d in it)", self.name,
                  len(self._open))
        if len(self._open) >= self.max_size:
            self._close()
        elif len(self._open) == 1:
            self._timer = asyncio.get_running_loop().call_later(self.max_wait, self._close)
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(item.future)
        except BaseException as exc:
            self._leave(item)
            if isinstance(exc, TimeoutError):
                raise ExecutionTimeout("the request's deadline passed in its batch") from None
            raise

    def _answered(self, future: asyncio.Future[Reply]) -> None:
        self._pending -= 1
        if not future.cancelled():
            future.exception()  # retrieved: its client may have left before the answer

    def _leave(self, item: Item) -> None:
        """The request gave up: out of a gathering batch, or its answer dropped."""
        if item in self._open:
            self._open.remove(item)
            log.debug("%s: a request left the gathering batch (%d in it)", self.name,
                      len(self._open))
            if not self._open and self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if not item.future.done():
            item.future.cancel()

    def _close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._open = self._open, []
        if batch:
            batch_id = uuid.uuid4().hex[:12]
            log.debug("%s: batch %s closes with %d request(s)", self.name, batch_id, len(batch))
            task = asyncio.ensure_future(self._run(batch_id, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Answer what is gathering now (kgpool stops), and wait for running batches."""
        self._close()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
