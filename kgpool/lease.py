"""What the pool is made of: leases of kernels, waiters, the status it reports and the events it
tells its listener; the back-off and exit-status rules of its supervision."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .kernel import Kernel

Accepts = Callable[[int], bool]  # which notebook versions a request can run on

BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
RESTART_LIMIT, RESTART_WINDOW = 5, 60.0  # crashes replaced at once; beyond, with back-off


def backoff(attempt: int) -> float:
    """0.5 s, 1 s, 2 s, ... up to 30 s for the n-th retry (from 1)."""
    return float(min(BACKOFF_FIRST * 2 ** (attempt - 1), BACKOFF_MAX))


class PoolListener(Protocol):
    """What the pool reports; metrics implement it, tests may too."""

    def kernel_restarted(self, reason: str) -> None: ...
    def kernel_exited(self, status: str) -> None: ...
    def queue_waited(self, seconds: float) -> None: ...
    def pool_resized(self, direction: str, reason: str) -> None: ...


class _Quiet:
    def kernel_restarted(self, reason: str) -> None: pass
    def kernel_exited(self, status: str) -> None: pass
    def queue_waited(self, seconds: float) -> None: pass
    def pool_resized(self, direction: str, reason: str) -> None: pass


class Watchdog:
    """The deadline of the request a kernel runs: past it, the request's task is cancelled
    (as asyncio.timeout would). One timer outlives the requests: armed for the first deadline,
    it is moved on, when it fires early, to the deadline of the request running then, so a
    request that ends in time costs no timer of its own."""

    __slots__ = ("_task", "_deadline", "_handle", "expired")

    def __init__(self) -> None:
        self._task: asyncio.Task[object] | None = None
        self._deadline = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self.expired = False  # it cancelled the task watched last

    def watch(self, task: asyncio.Task[object], deadline: float) -> None:
        self._task, self._deadline, self.expired = task, deadline, False
        handle = self._handle
        if handle is None or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._handle = asyncio.get_running_loop().call_at(deadline, self._check)

    def stop(self) -> None:
        self._task, self.expired = None, False

    def _check(self) -> None:
        self._handle = None
        task = self._task
        if task is None:
            return  # nothing running: the next watch() arms it again
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._handle = loop.call_at(self._deadline, self._check)
            return
        self.expired = True
        task.cancel()


@dataclass(eq=False)
class Lease:
    """A kernel of the pool; lent to one request at a time (pool.release gives it back)."""

    kernel: Kernel
    slot: int
    version: int  # which version of the notebook it was warmed with
    limit: int  # requests before recycling; 0 means never
    served: int = 0
    retiring: bool = False  # stopped when it is next idle (recycle, reload)
    dead: bool = False  # its process exited while it was lent
    unreported: bool = False  # replaced for an exit whose report had not come yet
    stopped: bool = False
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # set once it is stopped
    idle_since: float = 0.0
    deadline: Watchdog = field(default_factory=Watchdog)  # of the request it runs


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[Lease]
    accepts: Accepts | None

    def wants(self, lease: Lease) -> bool:
        return self.accepts is None or self.accepts(lease.version)


@dataclass(frozen=True)
class PoolStatus:
    desired: int  # kernels the pool is heading for, between floor and ceiling
    starting: int
    idle: int
    busy: int
    stopping: int
    queued: int
    capacity: int  # of the queue
    draining: bool
    failing: tuple[str, ...]
    rolling: bool = False
    floor: int = 0
    ceiling: int = 0


def describe_exit(code: int | None) -> str:
    """'exit code 1', 'signal 9 (SIGKILL)' — a kernel killed by the OOM killer shows -9."""
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
