"""KernelPool: N warm kernels, a bounded FIFO of waiters, and a supervisor that replaces kernels."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from .errors import ExecutionTimeout, InitError, PoolClosed, PoolUnavailable, QueueFull
from .kernel import Kernel

log = logging.getLogger(__name__)

# Factory contract: start a kernel for a slot and warm it; on failure leave no process behind.
KernelFactory = Callable[[int, Callable[[Kernel], None]], Awaitable[Kernel]]

BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0


class PoolListener(Protocol):
    """What the pool reports; metrics implement it, tests may too."""

    def kernel_restarted(self, reason: str) -> None: ...
    def queue_waited(self, seconds: float) -> None: ...


class _Quiet:
    def kernel_restarted(self, reason: str) -> None: pass
    def queue_waited(self, seconds: float) -> None: pass


@dataclass(eq=False)
class Lease:
    """A kernel lent to one request; give it back with pool.release(lease, outcome)."""

    kernel: Kernel
    slot: int
    limit: int  # requests before recycling; 0 means never
    served: int = 0
    retiring: bool = False


@dataclass(frozen=True)
class PoolStatus:
    desired: int
    starting: int
    idle: int
    busy: int
    stopping: int
    queued: int
    capacity: int
    draining: bool
    failing: tuple[str, ...]


class KernelPool:
    def __init__(self, factory: KernelFactory, size: int, *, max_queue: int,
                 max_requests: int = 0, max_requests_jitter: int = 0,
                 ready_size: int = 0, listener: PoolListener | None = None) -> None:
        self._factory = factory
        self.size = size
        # At start-up the pool opens (hands out kernels, says ready) once this many are warm,
        # so that the first requests spread over all of them, as Kernel Gateway's do.
        self.ready_size = min(ready_size or size, size)
        self.max_queue = max_queue
        self._max_requests = max_requests
        self._jitter = max_requests_jitter
        self._listener: PoolListener = listener or _Quiet()
        self._idle: deque[Lease] = deque()
        self._busy: set[Lease] = set()
        self._waiters: deque[asyncio.Future[Lease]] = deque()
        self._starting: dict[int, str] = {}  # slot -> why (start, crash, timeout, recycle)
        self._failing: dict[int, str] = {}  # slot -> last warm-up error
        self._warming: set[asyncio.Task[None]] = set()  # replacements being warmed
        self._tasks: set[asyncio.Task[None]] = set()  # shutdowns: awaited, never cancelled
        self._stopping = 0  # kernels being shut down
        self._draining = False
        self._closed = False
        self._started = False  # every slot got its first warm-up
        self._opened = False  # ready_size kernels were warm once: kernels are handed out
        self._idle_event = asyncio.Event()

    # ----- state -------------------------------------------------------------------------

    def status(self) -> PoolStatus:
        return PoolStatus(self.size, len(self._starting), len(self._idle), len(self._busy),
                          self._stopping, len(self._waiters), self.max_queue,
                          self._draining or self._closed, tuple(self._failing.values()))

    @property
    def ready(self) -> bool:
        """Opened, at least one warm kernel and not draining: worth sending traffic to."""
        return self._opened and not (self._draining or self._closed) and \
            bool(self._idle or self._busy)

    # ----- start and stop ----------------------------------------------------------------

    async def start(self) -> None:
        """Warm every slot concurrently, each serving as soon as it is warm; the first failure
        stops all of them and is raised."""
        for slot in range(self.size):
            self._starting[slot] = "start"
        started = time.monotonic()
        try:
            await _all_or_nothing([asyncio.create_task(self._start_slot(slot))
                                   for slot in range(self.size)])
        except BaseException:
            self._starting.clear()
            await self.close()
            raise
        self._started = True
        log.info("pool warm: %d kernel(s) in %.2fs", self.size, time.monotonic() - started)

    async def _start_slot(self, slot: int) -> None:
        lease = await self._spawn(slot)
        self._starting.pop(slot, None)
        self._hand_out(lease)

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests, let queued and running ones finish; True if all finished."""
        self._draining = True
        deadline = time.monotonic() + timeout
        while self._waiters or self._busy:
            self._idle_event.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle_event.wait(), remaining)
        return True

    async def close(self) -> None:
        """Stop everything now: fail waiters, cancel warm-ups, shut down every kernel."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolClosed("kgpool is shutting down"))
        for task in list(self._warming):
            task.cancel()
        await asyncio.gather(*self._warming, return_exceptions=True)
        for lease in list(self._idle) + list(self._busy):
            self._stop(lease)
        self._idle.clear()
        self._busy.clear()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ----- lending -----------------------------------------------------------------------

    async def acquire(self, deadline: float | None = None) -> Lease:
        """An idle kernel, or wait for one in FIFO order until the loop-time deadline."""
        if self._draining or self._closed:
            raise PoolClosed("kgpool is shutting down")
        if self._idle and not self._waiters and self._opened:
            self._listener.queue_waited(0.0)
            return self._lend(self._idle.popleft())
        if self._started and not self._idle and not self._busy and self._failing:
            raise PoolUnavailable("no warm kernel: " + "; ".join(self._failing.values()))
        if len(self._waiters) >= self.max_queue:
            raise QueueFull(f"{len(self._waiters)} request(s) already waiting for a kernel")
        waiter: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        queued_at = time.monotonic()
        try:
            async with asyncio.timeout_at(deadline):
                lease = await waiter
        except BaseException as exc:
            self._abandon(waiter)
            if isinstance(exc, TimeoutError):
                raise ExecutionTimeout("no kernel became free before the deadline") from None
            raise
        finally:
            self._listener.queue_waited(time.monotonic() - queued_at)
        return self._lend(lease)

    def _abandon(self, waiter: asyncio.Future[Lease]) -> None:
        """A waiter gave up (deadline, disconnect); a kernel it was just handed goes back."""
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            self._hand_out(waiter.result())
        else:
            waiter.cancel()
        self._notify_if_quiet()

    def _lend(self, lease: Lease) -> Lease:
        self._busy.add(lease)
        return lease

    def release(self, lease: Lease, outcome: str = "ok") -> None:
        """Take a kernel back. Anything but "ok" means its state is unknown: replace it."""
        if lease not in self._busy:
            return  # close() took it already
        self._busy.discard(lease)
        if outcome != "ok":
            self._replace(lease, outcome)
        elif lease.retiring and lease.slot not in self._starting:
            self._retire(lease)  # its replacement is already warm
        else:
            lease.served += 1
            if lease.limit and lease.served >= lease.limit and not lease.retiring:
                lease.retiring = True
                self._start_replacement(lease.slot, "recycle", old=lease)
            self._hand_out(lease)
        self._notify_if_quiet()

    def _hand_out(self, lease: Lease) -> None:
        """An idle kernel goes to the longest waiter, else to the back of the idle queue:
        handing out from the front spreads requests over every kernel in turn."""
        if self._closed:
            self._stop(lease)
            return
        if not self._opened:
            self._idle.append(lease)
            if len(self._idle) + len(self._busy) >= self.ready_size:
                self._open()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(lease)
                return
        self._idle.append(lease)

    def _open(self) -> None:
        self._opened = True
        while self._waiters and self._idle:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(self._idle.popleft())

    def _notify_if_quiet(self) -> None:
        if not self._busy and not self._waiters:
            self._idle_event.set()

    # ----- supervision -------------------------------------------------------------------

    def _kernel_died(self, lease: Lease) -> None:
        if lease in self._idle:  # busy kernels are reported by their request instead
            self._idle.remove(lease)
            self._replace(lease, "crash")

    def _replace(self, lease: Lease, reason: str) -> None:
        log.warning("kernel slot %d (pid %s) replaced: %s", lease.slot, lease.kernel.pid, reason)
        if reason != "recycle":
            lease.kernel.kill()  # its state is unknown and it may be spinning: no grace
        self._stop(lease)
        if lease.retiring and lease.slot in self._starting:
            return  # a recycle replacement for this slot is already warming
        self._start_replacement(lease.slot, reason)

    def _retire(self, lease: Lease) -> None:
        with contextlib.suppress(ValueError):
            self._idle.remove(lease)
        log.info("kernel slot %d (pid %s) retired after %d requests",
                 lease.slot, lease.kernel.pid, lease.served)
        self._stop(lease)

    def _start_replacement(self, slot: int, reason: str, old: Lease | None = None) -> None:
        if self._closed or self._draining:
            return
        self._listener.kernel_restarted(reason)
        self._starting[slot] = reason
        task = asyncio.ensure_future(self._warm_replacement(slot, old))
        self._warming.add(task)
        task.add_done_callback(self._warming.discard)

    async def _warm_replacement(self, slot: int, old: Lease | None) -> None:
        failures = 0
        while True:
            try:
                lease = await self._spawn(slot)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self._listener.kernel_restarted("init_failed")
                delay = min(BACKOFF_FIRST * 2 ** (failures - 1), BACKOFF_MAX)
                self._failing[slot] = f"slot {slot}: {exc}"
                log.error("kernel slot %d failed to warm (attempt %d), retrying in %.1fs: %s",
                          slot, failures, delay, exc)
                self._fail_waiters_if_no_kernel()
                await asyncio.sleep(delay)
        self._failing.pop(slot, None)
        self._starting.pop(slot, None)
        if old is not None and old not in self._busy:
            self._retire(old)  # idle (or already gone): retire it now, else at its release
        self._hand_out(lease)

    def _fail_waiters_if_no_kernel(self) -> None:
        if self._idle or self._busy:
            return
        error = PoolUnavailable("no warm kernel: " + "; ".join(self._failing.values()))
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    async def _spawn(self, slot: int) -> Lease:
        started = time.monotonic()
        holder: list[Lease] = []

        def died(_: Kernel) -> None:
            if holder:  # deaths during warm-up surface from the factory instead
                self._kernel_died(holder[0])

        kernel = await self._factory(slot, died)
        limit = self._max_requests + random.randint(0, self._jitter) if self._max_requests else 0
        lease = Lease(kernel, slot, limit)
        holder.append(lease)
        seconds = time.monotonic() - started
        log.info("kernel slot %d warm in %.2fs (pid %s)", slot, seconds, kernel.pid)
        if not kernel.is_alive:  # died between warm-up and now
            await kernel.shutdown()
            raise InitError(f"kernel for slot {slot} died right after warm-up")
        return lease

    def _stop(self, lease: Lease) -> None:
        self._stopping += 1
        self._track(self._shutdown(lease.kernel))

    async def _shutdown(self, kernel: Kernel) -> None:
        try:
            await kernel.shutdown()
        finally:
            self._stopping -= 1

    def _track(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _all_or_nothing(tasks: list[asyncio.Task[None]]) -> None:
    """Await all; on the first failure cancel the rest, wait for them, and re-raise it."""
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
