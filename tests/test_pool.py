"""KernelPool driven through every state with a fake factory: no processes, exact events."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from kgpool import pool as pool_module
from kgpool.errors import (
    EndpointRemoved,
    ExecutionTimeout,
    InitError,
    PoolClosed,
    PoolUnavailable,
    QueueFull,
)
from kgpool.pool import KernelPool, Lease, describe_exit

pytestmark = [pytest.mark.timeout(20), pytest.mark.channel_independent]
_pids = itertools.count(1000)


class FakeKernel:
    """What the pool uses of a kernel; tests make it die, hang or fail."""

    def __init__(self, version: int, slot: int, on_death: Callable[[Any], None]) -> None:
        self.version, self.slot, self.pid = version, slot, next(_pids)
        self._on_death = on_death
        self.alive = True
        self.exit_code: int | None = None
        self.shutdowns = self.kills = self.aborts = 0

    @property
    def is_alive(self) -> bool:
        return self.alive

    def die(self, code: int = -9, tell: bool = True) -> None:
        self.alive, self.exit_code = False, code
        if tell:
            self._on_death(self)

    def kill(self) -> None:
        self.kills += 1
        self.alive = False

    async def shutdown(self) -> None:
        self.shutdowns += 1
        self.alive = False

    async def abort(self) -> str:
        self.aborts += 1
        self.kill()
        return 'File "<endpoint 1>", line 2'


class Factory:
    """Makes FakeKernels; `fail` makes the next warm-ups fail, `gate` holds them."""

    def __init__(self) -> None:
        self.made: list[FakeKernel] = []
        self.fail = 0
        self.gate: asyncio.Event | None = None
        self.running = self.most = 0

    async def __call__(self, version: int, slot: int,
                       on_death: Callable[[Any], None]) -> FakeKernel:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(0)
            if self.fail:
                self.fail -= 1
                raise InitError("init cell 2 raised ValueError")
            kernel = FakeKernel(version, slot, on_death)
            self.made.append(kernel)
            return kernel
        finally:
            self.running -= 1


class Events:
    def __init__(self) -> None:
        self.restarts: list[str] = []
        self.exits: list[str] = []
        self.waits: list[float] = []
        self.resizes: list[tuple[str, str]] = []

    def kernel_restarted(self, reason: str) -> None:
        self.restarts.append(reason)

    def kernel_exited(self, status: str) -> None:
        self.exits.append(status)

    def queue_waited(self, seconds: float) -> None:
        self.waits.append(seconds)

    def pool_resized(self, direction: str, reason: str) -> None:
        self.resizes.append((direction, reason))


def make(size: int = 2, **kw: Any) -> tuple[KernelPool, Factory, Events]:
    factory, events = Factory(), Events()
    kw.setdefault("max_queue", 10)
    return KernelPool(factory, size, listener=events, **kw), factory, events  # type: ignore[arg-type]


async def until(condition: Callable[[], bool], what: str = "condition") -> None:
    """Let the loop run until the condition holds (events, not time)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


async def test_start_opens_once_ready_size_kernels_are_warm() -> None:
    pool, factory, _ = make(3, ready_size=3)
    factory.gate = asyncio.Event()
    start = asyncio.create_task(pool.start())
    early = asyncio.create_task(pool.acquire())  # a request before any kernel is warm
    await until(lambda: factory.running == 3)
    assert not pool.ready and pool.status().starting == 3 and pool.status().queued == 1
    factory.gate.set()
    await start
    lease = await early
    assert pool.ready and lease.kernel is factory.made[0]  # the first warm one
    pool.release(lease)
    await pool.close()


async def test_kernels_are_handed_out_in_turn() -> None:
    pool, factory, _ = make(3)
    await pool.start()
    order = []
    for _ in range(6):
        lease = await pool.acquire()
        order.append(lease.kernel)
        pool.release(lease)
    assert order == factory.made * 2
    await pool.close()


async def test_queue_bound_deadline_and_abandoned_waiters() -> None:
    pool, _, events = make(1, max_queue=1)
    await pool.start()
    held = await pool.acquire()
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(pool.acquire())
    await until(lambda: pool.status().queued == 1)
    with pytest.raises(QueueFull):
        await pool.acquire()
    waiting.cancel()  # a client that went away
    await until(lambda: pool.status().queued == 0)
    with pytest.raises(ExecutionTimeout):
        await pool.acquire(deadline=loop.time() + 0.01)
    pool.release(held)
    assert pool.status().idle == 1 and pool.status().busy == 0  # nothing leaked
    assert len(events.waits) == 3
    await pool.close()


async def test_a_kernel_given_to_a_waiter_that_left_goes_back() -> None:
    pool, _, _ = make(1)
    await pool.start()
    held = await pool.acquire()
    waiting = asyncio.create_task(pool.acquire())
    await until(lambda: pool.status().queued == 1)
    pool.release(held)  # hands the kernel to the waiter...
    waiting.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert pool.status().idle == 1
    await pool.close()


async def test_timeout_aborts_and_replaces() -> None:
    pool, factory, events = make(1)
    await pool.start()
    lease = await pool.acquire()
    pool.release(lease, "timeout")
    await until(lambda: pool.status().idle == 1)
    old = factory.made[0]
    assert old.aborts == 1 and old.shutdowns == 1  # its stack was asked for, then it stopped
    assert (await pool.acquire()).kernel is factory.made[1]
    assert events.restarts == ["timeout"]
    await pool.close()


async def test_idle_death_is_replaced_and_its_exit_status_reported() -> None:
    pool, factory, events = make(2)
    await pool.start()
    factory.made[0].die(-9)
    await until(lambda: len(factory.made) == 3 and pool.status().idle == 2)
    assert events.exits == ["signal 9 (SIGKILL)"] and events.restarts == ["crash"]
    await pool.close()


async def test_a_kernel_that_died_while_lent_is_never_lent_again() -> None:
    pool, factory, _ = make(1)
    await pool.start()
    lease = await pool.acquire()
    lease.kernel.die(1)  # after it answered, before the request released it
    pool.release(lease, "ok")
    nxt = await pool.acquire()
    assert nxt.kernel is factory.made[1] and nxt.kernel.is_alive
    await pool.close()


async def test_a_silent_death_is_caught_at_release() -> None:
    pool, factory, _ = make(1)
    await pool.start()
    lease = await pool.acquire()
    lease.kernel.die(0, tell=False)  # its exit has not reached the loop yet
    pool.release(lease, "ok")
    assert (await pool.acquire()).kernel is factory.made[1]
    await pool.close()


async def test_recycled_kernel_serves_until_its_replacement_is_warm() -> None:
    pool, factory, events = make(1, max_requests=2)
    await pool.start()
    first = factory.made[0]
    for _ in range(2):
        pool.release(await pool.acquire())
    factory.gate = asyncio.Event()  # the replacement is slow to warm
    await until(lambda: factory.running == 1)
    lease = await pool.acquire()
    assert lease.kernel is first  # still serving
    factory.gate.set()
    await until(lambda: len(factory.made) == 2)
    lease.kernel.die(-15)  # it crashes while retiring...
    pool.release(lease, "crash")
    await until(lambda: first.shutdowns == 1)
    assert first.shutdowns == 1 and len(factory.made) == 2  # ...stopped once, replaced once
    assert events.restarts == ["recycle"]
    await pool.close()


async def test_crashes_beyond_the_budget_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "RESTART_LIMIT", 1)
    monkeypatch.setattr(pool_module, "backoff", lambda attempt: 3600.0)
    pool, factory, _ = make(1)
    await pool.start()
    factory.made[0].die()
    await until(lambda: len(factory.made) == 2)  # within the budget: at once
    factory.made[1].die()  # (right after its warm-up: its task's callbacks have not run)
    await until(lambda: pool.status().starting == 1)
    for _ in range(100):
        await asyncio.sleep(0)
    assert len(factory.made) == 2  # beyond it: waiting its back-off
    assert pool.status().starting == 1  # the replacement waits; the slot is not given up
    await pool.close()
    assert pool.status().starting == 0


async def test_warm_ups_share_a_limit() -> None:
    pool, factory, _ = make(4, warmups=asyncio.Semaphore(2))
    factory.gate = asyncio.Event()
    start = asyncio.create_task(pool.start())
    await until(lambda: factory.running == 2)
    for _ in range(50):
        await asyncio.sleep(0)
    assert factory.running == 2
    factory.gate.set()
    await start
    assert factory.most == 2 and len(factory.made) == 4
    await pool.close()


async def test_failing_warm_ups_make_requests_fail_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "backoff", lambda attempt: 3600.0)
    pool, factory, events = make(1)
    await pool.start()
    factory.fail = 10
    factory.made[0].die(1)
    await until(lambda: bool(pool.status().failing))
    assert not pool.ready
    with pytest.raises(PoolUnavailable):
        await pool.acquire()
    assert "init_failed" in events.restarts
    await pool.close()


async def test_start_failure_stops_every_kernel() -> None:
    pool, factory, _ = make(3)
    factory.fail = 1
    with pytest.raises(InitError):
        await pool.start()
    assert all(k.shutdowns == 1 for k in factory.made)
    assert pool.status().idle == 0


async def test_roll_keeps_at_most_one_extra_kernel() -> None:
    pool, factory, events = make(3)
    await pool.start()
    held = await pool.acquire()  # an old kernel busy during the roll
    alive: list[int] = []

    def count() -> None:
        alive.append(sum(k.alive for k in factory.made))

    counting = True

    async def sample() -> None:
        while counting:
            count()
            await asyncio.sleep(0)

    sampler = asyncio.create_task(sample())
    roll = asyncio.create_task(pool.roll(2))
    await until(lambda: sum(k.version == 2 for k in factory.made) == 1)
    for _ in range(100):
        await asyncio.sleep(0)
    # the old kernel's request is still running: the roll waits for it before going on
    assert held.kernel.alive and sum(k.version == 2 for k in factory.made) == 1
    pool.release(held)
    await roll
    counting = False
    await sampler
    assert max(alive) <= 4
    assert [k.version for k in factory.made if k.alive] == [2, 2, 2]
    assert all(k.shutdowns == 1 for k in factory.made[:3])
    assert events.restarts.count("reload") == 3
    await pool.close()


async def test_roll_refused_when_the_new_version_cannot_warm() -> None:
    pool, factory, _ = make(2)
    await pool.start()
    factory.fail = 1
    with pytest.raises(InitError):
        await pool.roll(2)
    assert pool.version == 1 and pool.status().idle == 2
    assert all(k.alive and k.version == 1 for k in factory.made)
    await pool.close()


async def test_requests_for_a_removed_endpoint_fail_after_a_roll() -> None:
    pool, _, _ = make(1)
    await pool.start()
    held = await pool.acquire()
    only_old = asyncio.create_task(pool.acquire(accepts=lambda version: version == 1))
    any_version = asyncio.create_task(pool.acquire())
    await until(lambda: pool.status().queued == 2)
    roll = asyncio.create_task(pool.roll(2))
    got = await any_version  # the new kernel takes the request that any version can run
    assert got.version == 2
    pool.release(held)
    await roll
    with pytest.raises(EndpointRemoved):
        await only_old
    pool.release(got)
    await pool.close()


async def test_drain_then_close() -> None:
    pool, factory, _ = make(1)
    await pool.start()
    lease = await pool.acquire()
    drain = asyncio.create_task(pool.drain(10))
    await until(lambda: pool.status().draining)
    assert not pool.ready
    with pytest.raises(PoolClosed):
        await pool.acquire()
    pool.release(lease)
    assert await drain is True
    await pool.close()
    assert factory.made[0].shutdowns == 1


def test_exit_statuses_read_as_people_say_them() -> None:
    assert describe_exit(-9) == "signal 9 (SIGKILL)"
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(None) == "exit status unknown"


def test_leases_compare_by_identity() -> None:
    a = Lease(FakeKernel(1, 0, print), 0, 1, 0)  # type: ignore[arg-type]
    b = Lease(a.kernel, 0, 1, 0)
    assert a != b and len({a, b}) == 2


async def eventually(condition: Callable[[], bool], what: str = "condition") -> None:
    """For timer-driven behaviour (growth delay, idle timeout): poll the loop for up to 5 s."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


async def test_an_elastic_pool_grows_while_requests_wait_and_shrinks_when_idle() -> None:
    pool, factory, events = make(1, max_size=3, grow_delay=0.01, idle_timeout=0.1)
    await pool.start()
    held = [await pool.acquire()]
    waiting = [asyncio.create_task(pool.acquire()) for _ in range(4)]  # 4 wait, room for 2
    await eventually(lambda: len(factory.made) == 3, "growth to the ceiling")
    assert pool.status().desired == 3 and pool.status().ceiling == 3
    await until(lambda: sum(w.done() for w in waiting) == 2)
    assert len(factory.made) == 3  # never past the ceiling
    for lease in held + [w.result() for w in waiting if w.done()]:
        pool.release(lease)
    for task in waiting:
        if not task.done():
            pool.release(await task)
    await eventually(lambda: len(pool.members()) == 1, "shrink back to the floor")
    assert events.resizes == [("up", "queue")] * 2 + [("down", "idle")] * 2
    assert "scale_up" not in events.restarts  # growing is not restarting
    assert pool.status().desired == 1
    await pool.close()


async def test_one_short_wait_does_not_grow_the_pool() -> None:
    pool, factory, _ = make(1, max_size=4, grow_delay=3600)
    await pool.start()
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await until(lambda: pool.status().queued == 1)
    pool.release(held)  # served before the growth delay passed
    pool.release(await waiter)
    assert len(factory.made) == 1
    await pool.close()


async def test_an_extra_kernel_that_crashes_is_not_replaced_without_demand() -> None:
    pool, factory, _ = make(1, max_size=2, grow_delay=0.01, idle_timeout=3600)
    await pool.start()
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    extra = await waiter
    assert len(factory.made) == 2
    pool.release(held)
    extra.kernel.die(1)
    pool.release(extra, "crash")
    for _ in range(100):
        await asyncio.sleep(0)
    assert len(factory.made) == 2 and len(pool.members()) == 1  # back to the floor
    await pool.close()


async def test_an_exit_seen_before_its_report_is_still_counted_once() -> None:
    pool, factory, events = make(1)
    await pool.start()
    lease = await pool.acquire()
    kernel = factory.made[0]
    kernel.die(-9, tell=False)  # gone; the report (a forked worker's exit status) comes later
    pool.release(lease)  # release sees it dead: replaced at once
    await until(lambda: len(factory.made) == 2 and pool.status().idle == 1)
    kernel.die(-9)  # the report arrives
    assert events.exits == ["signal 9 (SIGKILL)"] and events.restarts == ["crash"]
    assert len(factory.made) == 2  # counted, not replaced a second time
    await pool.close()


async def test_recycle_replaces_gracefully_once() -> None:
    pool, factory, events = make(1)
    await pool.start()
    lease = await pool.acquire()
    old = factory.made[0]
    pool.recycle(lease, "memory")
    pool.recycle(lease, "memory")  # already retiring: nothing more
    await until(lambda: len(factory.made) == 2)
    assert old.kills == 0 and old.shutdowns == 0  # serves on while its replacement warms
    pool.release(lease)
    await until(lambda: old.shutdowns == 1)
    assert (await pool.acquire()).kernel is factory.made[1]
    assert events.restarts == ["memory"] and events.exits == []
    await pool.close()


async def test_a_warm_up_that_just_finished_is_not_counted_as_starting() -> None:
    pool, _, _ = make(1)
    start = asyncio.create_task(pool.start())

    async def first_request() -> int:
        lease = await pool.acquire()  # resumes before the warm-up task's done callbacks run
        pool.release(lease)
        return pool.status().starting

    assert await first_request() == 0
    await start
    await pool.close()


# ----- the per-kernel deadline (lease.Watchdog) ---------------------------------------------

async def _watched(watchdog: Any, deadline: float) -> float:
    """Runs until the watchdog cancels it; returns the loop time it was cancelled at."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    watchdog.watch(task, deadline)
    try:
        await loop.create_future()  # never done: only the watchdog ends this
    except asyncio.CancelledError:
        assert watchdog.expired
        task.uncancel()
        return loop.time()
    finally:
        watchdog.stop()
    raise AssertionError("not cancelled")


async def test_the_watchdog_cancels_a_request_past_its_deadline_and_no_earlier() -> None:
    from kgpool.lease import Watchdog
    loop = asyncio.get_running_loop()
    dog = Watchdog()
    first = loop.time() + 0.05
    assert await _watched(dog, first) >= first
    assert not dog.expired  # stop() forgets it


async def test_one_watchdog_timer_serves_requests_that_end_in_time() -> None:
    from kgpool.lease import Watchdog
    loop = asyncio.get_running_loop()
    dog = Watchdog()
    task = asyncio.current_task()
    assert task is not None
    early = loop.time() + 0.1
    dog.watch(task, early)  # a request that ends in time: its timer stays armed
    dog.stop()
    armed = dog._handle
    later = loop.time() + 0.3
    # the next request's deadline is later: the timer fires at `early`, finds it running and
    # moves on to its deadline instead of cancelling it
    assert await _watched(dog, later) >= later
    assert armed is not None and armed.when() == early
    sooner = loop.time() + 0.05
    dog.watch(task, loop.time() + 5)
    dog.stop()
    assert await _watched(dog, sooner) < loop.time() + 5  # an earlier deadline re-arms it
