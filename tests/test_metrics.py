"""kgpool/metrics.py: the request path's lock-free series, exposed as prometheus_client's own."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from kgpool.metrics import LoopCounter, LoopHistogram

pytestmark = pytest.mark.channel_independent
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# on a bound, between bounds, zero, past the last bound, a repeat
AMOUNTS = (0.0, 0.001, 0.0011, 0.0025, 0.3, 1.0, 29.9, 30.0, 31.0, 1e6, 0.3)


def exposition(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines()
            if "_created" not in line]


def test_loop_series_expose_what_prometheus_clients_would() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    counter = Counter("kgpool_http_requests", "HTTP requests answered.", ["route", "code"],
                      registry=theirs)
    histogram = Histogram("kgpool_x_seconds", "Time.", ["route"], buckets=BUCKETS,
                          registry=theirs)
    loop_counter = LoopCounter("kgpool_http_requests", "HTTP requests answered.",
                               ["route", "code"], ours)
    loop_histogram = LoopHistogram("kgpool_x_seconds", "Time.", ["route"], BUCKETS, ours)
    for route in ("/a", "/b/{id}"):
        for amount in AMOUNTS:
            histogram.labels(route).observe(amount)
            loop_histogram.labels(route).observe(amount)
        for code in ("200", "500", "200"):
            counter.labels(route, code).inc()
            loop_counter.labels(route, code).inc()
    assert exposition(ours) == exposition(theirs)
    assert 'kgpool_x_seconds_bucket{le="+Inf",route="/a"} 11.0' in exposition(ours)


def test_a_loop_histogram_given_inf_keeps_one_inf_bucket() -> None:
    registry = CollectorRegistry()
    LoopHistogram("kgpool_y", "Y.", [], (1.0, math.inf), registry).labels().observe(2.0)
    assert [line for line in exposition(registry) if "+Inf" in line] == \
        ['kgpool_y_bucket{le="+Inf"} 1.0']
