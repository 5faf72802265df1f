"""Prometheus collectors on an injected registry, with methods named for the events they count."""

from __future__ import annotations

import asyncio
import bisect
import math
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__
from .pool import PoolStatus

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LAG = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS",
                      "TRACE", "PATCH"})
_CHILD_CACHE = 4096  # label children kept for the hot path (routes x methods x statuses)
_STARTUP = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
RESTART_REASONS = ("crash", "timeout", "recycle", "init_failed", "reload", "cancelled",
                   "memory")
REJECT_REASONS = ("queue_full", "draining", "not_ready")
CONNECTION_CLOSE_REASONS = ("limit", "idle", "header_timeout")
# notebook name -> the status of every pool serving it (two while a reload swaps pools)
StatusSource = Callable[[], Mapping[str, list[PoolStatus]]]


def _with(buckets: tuple[float, ...], *extra: float | None) -> tuple[float, ...]:
    return tuple(sorted(set(buckets) | {x for x in extra if x}))


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _Observed:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0.0] * len(bounds)  # per bucket, not cumulative
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1  # the first bound >= it
        self.sum += amount


class LoopCounter(Collector):
    """A labelled counter for the request path, counted on the event loop in plain floats:
    prometheus_client's Counter takes a lock for every increment. Exposed as that Counter
    would be (without `_created`, which `kgpool serve` turns off anyway); scraped on the
    loop too (the /metrics handler)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry) -> None:
        self._name, self._doc, self._labelnames = name, documentation, tuple(labelnames)
        self._series: dict[tuple[str, ...], _Count] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Count:
        child = self._series.get(values)
        if child is None:
            child = self._series[values] = _Count()
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in list(self._series.items()):
            family.add_metric(values, child.value)
        yield family


class LoopHistogram(Collector):
    """A labelled histogram for the request path, observed on the event loop without the
    two locks and the bucket loop of prometheus_client's Histogram; exposed as it would be
    (`le` spelled by prometheus_client's own floatToGoString, +Inf last)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._name, self._doc, self._labelnames = name, documentation, tuple(labelnames)
        self._bounds = tuple(bounds)
        self._les = [floatToGoString(b) for b in bounds]
        self._series: dict[tuple[str, ...], _Observed] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Observed:
        child = self._series.get(values)
        if child is None:
            child = self._series[values] = _Observed(self._bounds)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in list(self._series.items()):
            total, buckets = 0.0, []
            for le, count in zip(self._les, child.counts, strict=True):
                total += count
                buckets.append((le, total))
            family.add_metric(values, buckets, child.sum)
        yield family


class _PoolCollector(Collector):
    """Queue and kernel gauges read from the pools at scrape time, so they are never stale."""

    def __init__(self, source: Callable[[], StatusSource | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        source = self._source()
        if source is None:
            return
        depth = GaugeMetricFamily("kgpool_queue_depth", "Requests waiting for a kernel.",
                                  labels=["notebook"])
        capacity = GaugeMetricFamily("kgpool_queue_capacity",
                                     "Requests allowed to wait for a kernel.",
                                     labels=["notebook"])
        kernels = GaugeMetricFamily("kgpool_kernels", "Kernels by state.",
                                    labels=["notebook", "state"])
        desired = GaugeMetricFamily("kgpool_kernels_desired", "Kernels the pool is heading "
                                    "for (between its floor and its ceiling).",
                                    labels=["notebook"])
        floor = GaugeMetricFamily("kgpool_kernels_min", "Kernels kept warm whatever the "
                                  "traffic (--kernels).", labels=["notebook"])
        ceiling = GaugeMetricFamily("kgpool_kernels_max", "Kernels the pool may grow to "
                                    "(--max-kernels).", labels=["notebook"])
        for name, statuses in source().items():
            live = [s for s in statuses if not s.draining] or statuses[:1]
            depth.add_metric([name], sum(s.queued for s in statuses))
            capacity.add_metric([name], sum(s.capacity for s in live))
            desired.add_metric([name], sum(s.desired for s in live))
            floor.add_metric([name], sum(s.floor for s in live))
            ceiling.add_metric([name], sum(s.ceiling for s in live))
            for state in ("starting", "idle", "busy", "stopping"):
                kernels.add_metric([name, state], sum(getattr(s, state) for s in statuses))
        yield from (depth, capacity, kernels, desired, floor, ceiling)


class Metrics:
    """Every kgpool metric; one instance per app, on the registry it is given."""

    def __init__(self, registry: CollectorRegistry, *, timeout: float | None = None) -> None:
        latency = _with(_LATENCY, timeout)
        # the four series every request touches: counted without a lock per call
        self.requests = LoopCounter("kgpool_http_requests", "HTTP requests answered.",
                                    ["notebook", "route", "method", "code"], registry)
        self.duration = LoopHistogram("kgpool_http_request_duration_seconds",
                                      "Time from request to response, queue wait included.",
                                      ["notebook", "route", "method"], latency, registry)
        self.execution = LoopHistogram("kgpool_execution_duration_seconds",
                                       "Time a kernel spent on a request's code.",
                                       ["notebook", "route"], latency, registry)
        self.queue_wait = LoopHistogram("kgpool_queue_wait_seconds",
                                        "Time a request waited for a kernel.", ["notebook"],
                                        latency, registry)
        self.in_flight = 0  # counted by the front door; read at scrape time (no lock per request)
        Gauge("kgpool_requests_in_flight", "Requests being handled, queued or running.",
              registry=registry).set_function(lambda: self.in_flight)
        self.rejected = Counter("kgpool_requests_rejected", "Requests refused without running.",
                                ["notebook", "reason"], registry=registry)
        self.restarts = Counter("kgpool_kernel_restarts", "Kernels replaced, by reason.",
                                ["notebook", "reason"], registry=registry)
        self.resizes = Counter("kgpool_pool_resizes", "Kernels added to or retired from an "
                               "elastic pool, by direction (up, down) and reason (queue: "
                               "requests waited; idle: nothing to do).",
                               ["notebook", "direction", "reason"], registry=registry)
        self.exits = Counter("kgpool_kernel_exits", "Kernels that exited on their own, by exit "
                             "status (signal 9 (SIGKILL) is often the out-of-memory killer).",
                             ["notebook", "status"], registry=registry)
        self.batch_size = Histogram("kgpool_batch_size", "Requests run together by a batched "
                                    "endpoint, per batch.", ["notebook", "route"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
                                    registry=registry)
        self.memory = Gauge("kgpool_kernel_memory_bytes", "Memory of each kernel (slot; "
                            "slot=\"template\": the --fork templates) by kind: private "
                            "(not shared with any other process: what --max-kernel-memory "
                            "limits) and pss (shared pages split between the processes that "
                            "map them: the kernels' pss adds up to what they cost together).",
                            ["notebook", "slot", "kind"], registry=registry)
        self.kernel_start = Histogram("kgpool_kernel_start_duration_seconds",
                                      "Time to start a kernel process until it answers.",
                                      ["notebook"], buckets=_STARTUP, registry=registry)
        self.init = Histogram("kgpool_init_duration_seconds",
                              "Time a kernel spent running the init cells.", ["notebook"],
                              buckets=_STARTUP, registry=registry)
        self.loop_lag = Histogram("kgpool_event_loop_lag_seconds",
                                  "How late the event loop ran a timer: time it spent on one "
                                  "piece of work, during which nothing else was answered.",
                                  buckets=_LAG, registry=registry)
        self.connections = Gauge("kgpool_connections", "Open client connections.",
                                 registry=registry)
        self.connections_closed = Counter(
            "kgpool_connections_closed", "Client connections kgpool refused or closed on its "
            "own: at --max-connections (limit: 503, idle: to make room), or because a request's "
            "head came too slowly (header_timeout).", ["reason"], registry=registry)
        for reason in CONNECTION_CLOSE_REASONS:
            self.connections_closed.labels(reason)
        info = Gauge("kgpool_build_info", "kgpool build information.",
                     ["version", "python"], registry=registry)
        info.labels(__version__, platform.python_version()).set(1)
        self._source: StatusSource | None = None
        self._answered: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}
        registry.register(_PoolCollector(lambda: self._source))
        if registry is not REGISTRY:  # the default one has the process collectors already
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

    async def probe_loop(self, interval: float = 0.02) -> None:
        """Measure, forever, how late the loop wakes from a short sleep (its lag)."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(interval)
            self.loop_lag.observe(max(0.0, loop.time() - start - interval))

    def watch_pools(self, source: StatusSource) -> None:
        self._source = source

    def for_notebook(self, name: str) -> NotebookMetrics:
        return NotebookMetrics(self, name)

    def answered(self, notebook: str, route: str, method: str, code: int,
                 seconds: float) -> None:
        if method not in _METHODS:
            method = "other"  # a client's own method names would each make new series
        key = (notebook, route, method, code)
        children = self._answered.get(key)
        if children is None:  # labels() once per series, not per request
            if len(self._answered) >= _CHILD_CACHE:
                self._answered.clear()
            children = self._answered[key] = (
                self.requests.labels(notebook, route, method, str(code)),
                self.duration.labels(notebook, route, method))
        children[0].inc()
        children[1].observe(seconds)


class NotebookMetrics:
    """The events of one notebook's service and pool (it is the pool's PoolListener)."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.name = name
        self._m = metrics
        self._memory_slots: set[str] = set()
        self._queue_wait = metrics.queue_wait.labels(name)
        self._executed: dict[str, Any] = {}
        for reason in RESTART_REASONS:  # zero series exist before the first event
            metrics.restarts.labels(name, reason)
        for reason in REJECT_REASONS:
            metrics.rejected.labels(name, reason)
        for direction, reason in (("up", "queue"), ("down", "idle")):
            metrics.resizes.labels(name, direction, reason)
        for status in ("exit code 1", "signal 9 (SIGKILL)"):  # crash, out-of-memory kill
            metrics.exits.labels(name, status)

    def kernel_restarted(self, reason: str) -> None:
        self._m.restarts.labels(self.name, reason).inc()

    def kernel_memory(self, samples: Mapping[str, tuple[int, int]]) -> None:
        """The latest (private, pss) bytes of each kernel, by slot; gone slots are dropped."""
        for slot in self._memory_slots - samples.keys():
            for kind in ("private", "pss"):
                self._m.memory.remove(self.name, slot, kind)
        for slot, (private, pss) in samples.items():
            self._m.memory.labels(self.name, slot, "private").set(private)
            self._m.memory.labels(self.name, slot, "pss").set(pss)
        self._memory_slots = set(samples)

    def kernel_exited(self, status: str) -> None:
        self._m.exits.labels(self.name, status).inc()

    def pool_resized(self, direction: str, reason: str) -> None:
        self._m.resizes.labels(self.name, direction, reason).inc()

    def queue_waited(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def kernel_warmed(self, start_seconds: float, init_seconds: float) -> None:
        self._m.kernel_start.labels(self.name).observe(start_seconds)
        self._m.init.labels(self.name).observe(init_seconds)

    def batched(self, route: str, size: int) -> None:
        self._m.batch_size.labels(self.name, route).observe(size)

    def executed(self, route: str, seconds: float) -> None:
        child = self._executed.get(route)
        if child is None:
            if len(self._executed) >= _CHILD_CACHE:
                self._executed.clear()
            child = self._executed[route] = self._m.execution.labels(self.name, route)
        child.observe(seconds)

    def rejected_request(self, reason: str) -> None:
        self._m.rejected.labels(self.name, reason).inc()
