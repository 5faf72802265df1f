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
