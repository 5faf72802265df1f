"""KernelPool: the warm kernels of one notebook, a bounded FIFO of waiters, and a supervisor that
replaces (never reuses), recycles and rolls kernels, with a restart budget."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .errors import (
    EndpointRemoved,
    ExecutionTimeout,
    InitError,
    PoolClosed,
    PoolUnavailable,
    QueueFull,
)
from .kernel import Kernel
from .lease import (
    RESTART_LIMIT,
    RESTART_WINDOW,
    Accepts,
    Lease,
    PoolListener,
    PoolStatus,
    _Quiet,
    _Waiter,
    backoff,
    describe_exit,
)

__all__ = ["Accepts", "KernelFactory", "KernelPool", "Lease", "PoolListener", "PoolStatus",
           "describe_exit"]
log = logging.getLogger(__name__)

# (version, slot, on_death) -> a warm kernel of that notebook version; on failure it leaves no
# process behind.
KernelFactory = Callable[[int, int, Callable[[Kernel], None]], Awaitable[Kernel]]
T = TypeVar("T")


class KernelPool:
    def __init__(self, factory: KernelFactory, size: int, *, max_queue: int,
                 max_requests: int = 0, max_requests_jitter: int = 0, ready_size: int = 0,
                 version: int = 1, warmups: asyncio.Semaphore | None = None,
                 max_size: int = 0, grow_delay: float = 0.1, idle_timeout: float = 60.0,
                 listener: PoolListener | None = None) -> None:
        self._factory = factory
        self.size = size  # the floor: kernels kept warm whatever the traffic
        # Elastic: while requests wait longer than grow_delay, more kernels are warmed, up to
        # max_size; one idle for idle_timeout beyond the floor retires.
        self.max_size = max(max_size, size)
        self.grow_delay, self.idle_timeout = grow_delay, idle_timeout
        self._grow_timer: asyncio.TimerHandle | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.max_queue = max_queue
        # At start-up the pool opens (hands out kernels, says ready) once this many are warm,
        # so that the first requests spread over all of them, as Kernel Gateway's do.
        self.ready_size = min(ready_size or size, size)
        self.version = version  # what new kernels are warmed with
        self._max_requests = max_requests
        self._jitter = max_requests_jitter
        self._warmups = warmups or asyncio.Semaphore(size)
        self._listener: PoolListener = listener or _Quiet()
        self._idle: deque[Lease] = deque()
        self._busy: set[Lease] = set()
        self._waiters: deque[_Waiter] = deque()
        self._starting: dict[asyncio.Task[Any], tuple[int, str]] = {}  # warm-ups: slot, why
        self._failing: dict[int, str] = {}  # slot -> last warm-up error
        self._crashes: deque[float] = deque()  # recent unexpected deaths, for the budget
        self._tasks: set[asyncio.Task[None]] = set()  # shutdowns: awaited, never cancelled
        self._stopping = 0
        self._draining = self._closed = self._started = self._opened = False
        self._rolling = False
        self._quiet = asyncio.Event()  # no request running or waiting

    # ----- state -------------------------------------------------------------------------

    def status(self) -> PoolStatus:
        starting = len(self._warming_slots())
        desired = max(self.size, len(self._idle) + len(self._busy) + starting)
        return PoolStatus(min(desired, self.max_size), starting, len(self._idle),
                          len(self._busy), self._stopping, len(self._waiters), self.max_queue,
                          self._draining or self._closed, tuple(self._failing.values()),
                          self._rolling, self.size, self.max_size)

    @property
    def ready(self) -> bool:
        """Opened, at least one warm kernel and not draining: worth sending traffic to."""
        return self._opened and not (self._draining or self._closed) and \
            bool(self._idle or self._busy)

    def members(self) -> list[Lease]:
        """Every kernel that serves or may serve again: idle and lent."""
        return [*self._idle, *self._busy]

    # ----- start and stop ----------------------------------------------------------------

    async def start(self) -> None:
        """Warm every slot concurrently (as many at once as the warm-up limit lets); the first
        failure stops all of them and is raised."""
        started = time.monotonic()
        tasks = [self._track_start(slot, "start", self._start_slot(slot))
                 for slot in range(self.size)]
        try:
            await _all_or_nothing(tasks)
        except BaseException:
            await self.close()
            raise
        self._started = True
        if self.max_size > self.size:
            self._reaper = asyncio.ensure_future(self._retire_idle_extras())
        log.info("pool warm: %d kernel(s) in %.2fs", self.size, time.monotonic() - started)

    async def _start_slot(self, slot: int) -> None:
        self._hand_out(await self._spawn(slot, self.version))

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests, let queued and running ones finish; True if all finished."""
        self._draining = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._waiters or self._busy:
                    self._quiet.clear()
                    await self._quiet.wait()
        return not (self._waiters or self._busy)

    async def close(self) -> None:
        """Stop everything now: fail waiters, cancel warm-ups, shut down every kernel."""
        self._closed = True
        if self._grow_timer is not None:
            self._grow_timer.cancel()
        if self._reaper is not None:
            self._reaper.cancel()
        self._fail_waiters(PoolClosed("kgpool is shutting down"))
        for task in list(self._starting):
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
        for lease in self.members():
            self._stop(lease)
        self._idle.clear()
        self._busy.clear()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ----- lending -----------------------------------------------------------------------

    async def acquire(self, deadline: float | None = None,
                      accepts: Accepts | None = None) -> Lease:
        """An idle kernel whose version `accepts` takes, or wait for one in FIFO order until
        the loop-time deadline."""
        if self._draining or self._closed:
            raise PoolClosed("kgpool is shutting down")
        waiter = _Waiter(asyncio.get_running_loop().create_future(), accepts)
        if self._opened:
            # no earlier waiter wants any idle kernel (_hand_out keeps it so): take one
            for lease in self._idle:
                if waiter.wants(lease):
                    self._idle.remove(lease)
                    self._listener.queue_waited(0.0)
                    return self._lend(lease)
        if self._started and not self._idle and not self._busy and self._failing:
            raise PoolUnavailable(self._why_unavailable())
        if len(self._waiters) >= self.max_queue:
            raise QueueFull(f"{len(self._waiters)} request(s) already waiting for a kernel")
        self._waiters.append(waiter)
        self._schedule_growth()
        queued_at = time.monotonic()
        try:
            async with asyncio.timeout_at(deadline):
                lease = await waiter.future
        except BaseException as exc:
            self._abandon(waiter)
            if isinstance(exc, TimeoutError):
                raise ExecutionTimeout("no kernel became free before the deadline") from None
            raise
        finally:
            self._listener.queue_waited(time.monotonic() - queued_at)
        return self._lend(lease)

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter gave up (deadline, disconnect); a kernel it was just handed goes back."""
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            self._hand_out(future.result())
        else:
            future.cancel()
        self._notify_if_quiet()

    def _lend(self, lease: Lease) -> Lease:
        self._busy.add(lease)
        return lease

    def release(self, lease: Lease, outcome: str = "ok") -> None:
        """Take a kernel back. Anything but "ok" means its state is unknown: replace it."""
        if lease not in self._busy:
            return  # close() took it already
        self._busy.discard(lease)
        if outcome == "ok" and (lease.dead or not lease.kernel.is_alive):
            outcome = "crash"  # it died after answering: never lend it again
        if outcome != "ok":
            self._replace(lease, outcome)
        elif lease.retiring and not self._warming(lease.slot):
            self._stop(lease)  # its replacement is warm: retire it now
        else:
            lease.served += 1
            if lease.limit and lease.served >= lease.limit and not lease.retiring:
                lease.retiring = True  # keeps serving until its replacement is warm
                self._start_replacement(lease.slot, "recycle", old=lease)
            self._hand_out(lease, checked=True)
        self._notify_if_quiet()

    def recycle(self, lease: Lease, reason: str) -> None:
        """Replace a kernel gracefully, as --max-requests does: it serves until its
        replacement is warm (e.g. past --max-kernel-memory)."""
        if lease.retiring or lease.stopped or lease not in self.members():
            return
        lease.retiring = True
        self._start_replacement(lease.slot, reason, old=lease)

    def _hand_out(self, lease: Lease, checked: bool = False) -> None:
        """A kernel goes to the longest waiter that takes its version, else to the back of the
        idle queue: handing out from the front spreads requests over every kernel in turn.
        (`checked`: release() has just asked the process whether it lives.)"""
        if self._closed or lease.stopped:
            self._stop(lease)
            return
        if not checked and (lease.dead or not lease.kernel.is_alive):
            self._replace(lease, "crash")
            return
        if self._opened:
            for waiter in self._waiters:
                if not waiter.future.done() and waiter.wants(lease):
                    self._waiters.remove(waiter)
                    waiter.future.set_result(lease)
                    return
        lease.idle_since = time.monotonic()
        self._idle.append(lease)
        if not self._opened and len(self._idle) + len(self._busy) >= self.ready_size:
            self._opened = True
            for idle in list(self._idle):
                self._idle.remove(idle)
                self._hand_out(idle)

    def _notify_if_quiet(self) -> None:
        if not self._busy and not self._waiters:
            self._quiet.set()

    def _fail_waiters(self, error: Exception) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(error)
        self._notify_if_quiet()

    def _why_unavailable(self) -> str:
        """Quotes init cells: the web layer shows it only to a request with the token."""
        return "no warm kernel: " + "; ".join(self._failing.values())

    def _fail_orphans(self) -> None:
        """Waiters for an endpoint that no remaining version has (a reload removed it)."""
        versions = {lease.version for lease in self.members()} | {self.version}
        for waiter in list(self._waiters):
            if waiter.accepts is not None and not any(map(waiter.accepts, versions)):
                self._waiters.remove(waiter)
                if not waiter.future.done():
                    waiter.future.set_exception(
                        EndpointRemoved("a reload removed this endpoint"))
        self._notify_if_quiet()

    # ----- supervision -------------------------------------------------------------------

    def _kernel_died(self, lease: Lease) -> None:
        if lease.stopped and not lease.unreported:
            return  # we stopped it
        # a forked worker may know only the cause (its template died): it says so
        status = getattr(lease.kernel, "exit_status", None) or \
            describe_exit(lease.kernel.exit_code)
        log.warning("kernel slot %d (pid %s) exited unexpectedly: %s", lease.slot,
                    lease.kernel.pid, status)
        self._listener.kernel_exited(status)
        if lease.stopped:
            return  # already being replaced: its exit was seen before this report
        if lease in self._idle:
            self._idle.remove(lease)
            self._replace(lease, "crash")
        else:
            lease.dead = True  # lent: its request fails, then release() replaces it

    def _replace(self, lease: Lease, reason: str) -> None:
        if lease.stopped:
            return
        log.warning("kernel slot %d (pid %s) replaced: %s", lease.slot, lease.kernel.pid, reason)
        # it exited before the report of its death came (that comes next: count it then)
        lease.unreported = not lease.dead and not lease.kernel.is_alive
        delay = 0.0
        if reason == "crash":
            delay = self._crash_delay()
        if reason == "timeout":
            self._stop(lease, abort=True)  # its traceback first: where did it hang?
        else:
            if reason != "recycle":
                lease.kernel.kill()  # its state is unknown and it may be spinning: no grace
            self._stop(lease)
        if lease.retiring and self._warming(lease.slot):
            return  # a replacement for this slot is already warming
        if reason != "recycle" and not self._waiters and \
                len(self.members()) + len(self._warming_slots()) >= self.size:
            return  # one of the extra kernels: demand warms another if it comes back
        self._start_replacement(lease.slot, reason, delay=delay)

    def _crash_delay(self) -> float:
        """Crashes beyond the budget (RESTART_LIMIT per RESTART_WINDOW) wait, doubling."""
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and self._crashes[0] < now - RESTART_WINDOW:
            self._crashes.popleft()
        over = len(self._crashes) - RESTART_LIMIT
        if over <= 0:
            return 0.0
        delay = backoff(over)
        log.error("%d kernel crashes in the last %.0fs: the next replacement waits %.1fs",
                  len(self._crashes), RESTART_WINDOW, delay)
        return delay

    def _warming(self, slot: int) -> bool:
        return slot in self._warming_slots()

    def _warming_slots(self) -> list[int]:
        """The slots being warmed. A finished warm-up stays in _starting until its done
        callback runs, its kernel a member already: counting it twice lost a slot when a
        kernel died in that moment (its replacement looked like an extra kernel)."""
        return [slot for task, (slot, _) in self._starting.items() if not task.done()]

    def _start_replacement(self, slot: int, reason: str, old: Lease | None = None,
                           delay: float = 0.0) -> None:
        if self._closed or self._draining:
            return
        self._listener.kernel_restarted(reason)
        self._track_start(slot, reason, self._warm_replacement(slot, old, delay))

    def _track_start(self, slot: int, reason: str, coro: Awaitable[T]) -> asyncio.Task[T]:
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        self._starting[task] = (slot, reason)
        task.add_done_callback(self._starting_done)
        return task

    def _starting_done(self, task: asyncio.Task[Any]) -> None:
        self._starting.pop(task, None)
        if not task.cancelled():
            task.exception()  # retrieved; start() and roll() report their own

    async def _warm_replacement(self, slot: int, old: Lease | None, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        lease = await self._spawn_retrying(slot)
        if old is not None and old not in self._busy:
            with contextlib.suppress(ValueError):
                self._idle.remove(old)
            self._stop(old)  # idle (or already gone): retire it now, else at its release
        self._hand_out(lease)

    async def _spawn_retrying(self, slot: int) -> Lease:
        """A warm kernel of the current version for `slot`, retrying failures with back-off;
        while no kernel is warm, waiters fail at once instead of timing out."""
        failures = 0
        while True:
            try:
                lease = await self._spawn(slot, self.version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self._listener.kernel_restarted("init_failed")
                self._failing[slot] = f"slot {slot}: {exc}"
                log.error("kernel slot %d failed to warm (attempt %d), retrying in %.1fs: %s",
                          slot, failures, backoff(failures), exc)
                if not self._idle and not self._busy:
                    self._fail_waiters(PoolUnavailable(self._why_unavailable()))
                await asyncio.sleep(backoff(failures))
                continue
            self._failing.pop(slot, None)
            return lease

    async def _spawn(self, slot: int, version: int) -> Lease:
        holder: list[Lease] = []

        def died(_: Kernel) -> None:
            if holder:  # deaths during warm-up surface from the factory instead
                self._kernel_died(holder[0])

        async with self._warmups:  # a crash loop must not start every kernel at once
            started = time.monotonic()
            kernel = await self._factory(version, slot, died)
        limit = self._max_requests + random.randint(0, self._jitter) if self._max_requests else 0
        lease = Lease(kernel, slot, version, limit)
        holder.append(lease)
        log.info("kernel slot %d warm in %.2fs (pid %s)", slot, time.monotonic() - started,
                 kernel.pid)
        if not kernel.is_alive:  # died between warm-up and now
            await kernel.shutdown()
            raise InitError(f"kernel for slot {slot} died right after warm-up")
        return lease

    def _stop(self, lease: Lease, abort: bool = False) -> None:
        """Shut a kernel down, once; `abort` logs where it hung first."""
        if lease.stopped:
            return
        lease.stopped = True
        with contextlib.suppress(ValueError):
            self._idle.remove(lease)
        self._stopping += 1
        task = asyncio.ensure_future(self._shutdown(lease, abort))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shutdown(self, lease: Lease, abort: bool) -> None:
        try:
            if abort:
                where = await lease.kernel.abort()
                log.warning("kernel slot %d (pid %s) was stopped past its deadline%s",
                            lease.slot, lease.kernel.pid,
                            f"; it was running:\n{where}" if where else
                            " (no traceback available)")
            await lease.kernel.shutdown()
        finally:
            self._stopping -= 1
            lease.gone.set()

    # ----- elastic size --------------------------------------------------------------------

    def _schedule_growth(self) -> None:
        if self.max_size > self.size and self._grow_timer is None and self._opened:
            self._grow_timer = asyncio.get_running_loop().call_later(self.grow_delay,
                                                                     self._grow)

    def _grow(self) -> None:
        """Requests waited past grow_delay: warm a kernel for each waiter that no kernel
        already warming will take, as far as the ceiling allows."""
        self._grow_timer = None
        if self._closed or self._draining:
            return
        waiting = sum(1 for waiter in self._waiters if not waiter.future.done())
        warming = len(self._warming_slots())
        room = self.max_size - len(self.members()) - warming
        for _ in range(max(0, min(waiting - warming, room))):
            slot = self._free_slot()
            self._listener.pool_resized("up", "queue")
            log.info("growing the pool: slot %d for %d waiting request(s)", slot, waiting)
            self._track_start(slot, "scale_up", self._warm_extra(slot))

    async def _warm_extra(self, slot: int) -> None:
        try:
            lease = await self._spawn(slot, self.version)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # no retry: the floor's supervision keeps the pool alive
            log.error("extra kernel slot %d failed to warm: %s", slot, exc)
            return
        self._hand_out(lease)
        if self._waiters:
            self._schedule_growth()

    def _free_slot(self) -> int:
        used = {lease.slot for lease in self.members()} | \
            {slot for slot, _ in self._starting.values()}
        return next(n for n in range(len(used) + 1) if n not in used)

    async def _retire_idle_extras(self) -> None:
        """Kernels beyond the floor that stayed idle for idle_timeout retire, longest first."""
        while True:
            await asyncio.sleep(min(self.idle_timeout / 2, 5.0))
            excess = len(self.members()) - self.size
            now = time.monotonic()
            for lease in sorted(self._idle, key=lambda m: m.idle_since):
                if excess <= 0 or now - lease.idle_since < self.idle_timeout:
                    break
                log.info("shrinking the pool: slot %d idle for %.0fs", lease.slot,
                         now - lease.idle_since)
                self._listener.pool_resized("down", "idle")
                self._stop(lease)
                excess -= 1

    # ----- reload ------------------------------------------------------------------------

    async def roll(self, version: int, on_first: Callable[[], None] | None = None) -> None:
        """Replace every kernel by one of `version`, one at a time: warm a new kernel, lend it,
        then retire an old one (stopped once idle), so at most one extra kernel runs. Raises
        if the first new kernel cannot be warmed (the old version keeps serving); `on_first`
        is called once it is warm, before it is lent."""
        old_version, self.version = self.version, version
        self._rolling = True
        try:
            olds = sorted((m for m in self.members() if m.version != version),
                          key=lambda m: m.slot)
            for number, old in enumerate(olds):
                if self._closed or self._draining:
                    return
                self._listener.kernel_restarted("reload")
                if number == 0:  # a version that cannot warm at all is refused
                    try:
                        lease = await self._track_start(old.slot, "reload",
                                                        self._spawn(old.slot, version))
                    except BaseException:
                        self.version = old_version
                        raise
                    if on_first is not None:
                        on_first()
                else:
                    lease = await self._track_start(old.slot, "reload",
                                                    self._spawn_retrying(old.slot))
                self._hand_out(lease)
                if not old.stopped:
                    old.retiring = True
                    if old not in self._busy:
                        self._stop(old)
                    await old.gone.wait()
                self._fail_orphans()
        finally:
            self._rolling = False


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
