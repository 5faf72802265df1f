"""Prometheus collectors on an injected registry, with methods named for the events they count."""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator

from prometheus_client import (
    REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.registry import Collector

from . import __version__
from .pool import PoolStatus

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_STARTUP = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


def _with(buckets: tuple[float, ...], *extra: float | None) -> tuple[float, ...]:
    return tuple(sorted(set(buckets) | {x for x in extra if x}))


class _PoolCollector(Collector):
    """Queue and kernel gauges read from the pool at scrape time, so they are never stale."""

    def __init__(self, status: Callable[[], PoolStatus | None]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        if status is None:
            return
        depth = GaugeMetricFamily("kgpool_queue_depth", "Requests waiting for a kernel.")
        depth.add_metric([], status.queued)
        kernels = GaugeMetricFamily("kgpool_kernels", "Kernels by state.", labels=["state"])
        for state, count in (("starting", status.starting), ("idle", status.idle),
                             ("busy", status.busy), ("stopping", status.stopping)):
            kernels.add_metric([state], count)
        desired = GaugeMetricFamily("kgpool_kernels_desired", "Kernels the pool keeps warm.")
        desired.add_metric([], status.desired)
        yield from (depth, kernels, desired)


class Metrics:
    """Every kgpool metric; one instance per app, on the registry it is given."""

    def __init__(self, registry: CollectorRegistry, *, timeout: float | None = None,
                 max_queue: int = 0) -> None:
        latency = _with(_LATENCY, timeout)
        self.requests = Counter("kgpool_http_requests", "HTTP requests answered.",
                                ["route", "method", "code"], registry=registry)
        self.duration = Histogram("kgpool_http_request_duration_seconds",
                                  "Time from request to response, queue wait included.",
                                  ["route", "method"], buckets=latency, registry=registry)
        self.execution = Histogram("kgpool_execution_duration_seconds",
                                   "Time a kernel spent on a request's code.", ["route"],
                                   buckets=latency, registry=registry)
        self.queue_wait = Histogram("kgpool_queue_wait_seconds",
                                    "Time a request waited for a kernel.", buckets=latency,
                                    registry=registry)
        self.in_flight = Gauge("kgpool_requests_in_flight",
                               "Requests being handled, queued or running.", registry=registry)
        self.rejected = Counter("kgpool_requests_rejected", "Requests refused without running.",
                                ["reason"], registry=registry)
        self.restarts = Counter("kgpool_kernel_restarts", "Kernels replaced, by reason.",
                                ["reason"], registry=registry)
        self.kernel_start = Histogram("kgpool_kernel_start_duration_seconds",
                                      "Time to start a kernel process until it answers.",
                                      buckets=_STARTUP, registry=registry)
        self.init = Histogram("kgpool_init_duration_seconds",
                              "Time a kernel spent running the init cells.",
                              buckets=_STARTUP, registry=registry)
        capacity = Gauge("kgpool_queue_capacity", "Requests allowed to wait for a kernel.",
                         registry=registry)
        capacity.set(max_queue)
        info = Gauge("kgpool_build_info", "kgpool build information.",
                     ["version", "python"], registry=registry)
        info.labels(__version__, platform.python_version()).set(1)
        for reason in ("crash", "timeout", "recycle", "init_failed"):  # zero series exist before the first event
            self.restarts.labels(reason)
        for reason in ("queue_full", "draining", "not_ready"):
            self.rejected.labels(reason)
        self._status: Callable[[], PoolStatus | None] = lambda: None
        registry.register(_PoolCollector(lambda: self._status()))
        if registry is not REGISTRY:  # the default one has the process collectors already
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

    def watch_pool(self, status: Callable[[], PoolStatus | None]) -> None:
        self._status = status

    # PoolListener
    def kernel_restarted(self, reason: str) -> None:
        self.restarts.labels(reason).inc()

    def queue_waited(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    # events from the service and the web layer
    def kernel_warmed(self, start_seconds: float, init_seconds: float) -> None:
        self.kernel_start.observe(start_seconds)
        self.init.observe(init_seconds)

    def executed(self, route: str, seconds: float) -> None:
        self.execution.labels(route).observe(seconds)

    def answered(self, route: str, method: str, code: int, seconds: float) -> None:
        self.requests.labels(route, method, str(code)).inc()
        self.duration.labels(route, method).observe(seconds)

    def rejected_request(self, reason: str) -> None:
        self.rejected.labels(reason).inc()
