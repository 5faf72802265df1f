"""The aiohttp app in-process (pytest-aiohttp): exact metrics on an injected registry."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import NOTEBOOKS
from prometheus_client import CollectorRegistry

from kgpool.config import Settings
from kgpool.web import MOUNTS, create_app

pytestmark = pytest.mark.timeout(90)
ClientFactory = Callable[[Any], Awaitable[TestClient]]


async def make_client(aiohttp_client: ClientFactory, registry: CollectorRegistry,
                      **settings: Any) -> TestClient:
    cfg = Settings(notebooks=(str(NOTEBOOKS / "kitchen.ipynb"),),
                   channel=os.environ.get("KGPOOL_CHANNEL", "direct"),
                   fork=os.environ.get("KGPOOL_FORK", "") not in ("", "0"), **settings)
    client = await aiohttp_client(create_app(cfg, registry))
    await client.app[MOUNTS].warmed()
    return client


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value; a series that does not exist fails the test (it is not a zero)."""
    value = registry.get_sample_value(name, labels)
    assert value is not None, f"no series {name}{labels}"
    return value


async def test_counters_are_exact(aiohttp_client: ClientFactory) -> None:
    registry = CollectorRegistry()
    client = await make_client(aiohttp_client, registry, kernels=1, timeout=3)
    for _ in range(5):
        assert (await client.get("/state")).status == 200
    for _ in range(2):
        assert (await client.get("/raise")).status == 500
    assert (await client.get("/no/such/thing")).status == 404
    assert (await client.post("/state")).status == 405
    assert (await client.get("/loop")).status == 504
    assert (await client.get("/healthz")).status == 200  # operational paths are not counted
    total = "kgpool_http_requests_total"
    nb = "kitchen"
    assert sample(registry, total, notebook=nb, route="/state", method="GET", code="200") == 5
    assert sample(registry, total, notebook=nb, route="/raise", method="GET", code="500") == 2
    assert sample(registry, total, notebook="", route="unmatched", method="GET",
                  code="404") == 1
    assert sample(registry, total, notebook=nb, route="/state", method="POST", code="405") == 1
    assert sample(registry, total, notebook=nb, route="/loop", method="GET", code="504") == 1
    assert sample(registry, "kgpool_http_request_duration_seconds_count", notebook=nb,
                  route="/state", method="GET") == 5
    assert sample(registry, "kgpool_kernel_restarts_total", notebook=nb, reason="timeout") == 1
    assert sample(registry, "kgpool_kernels_desired", notebook=nb) == 1
    assert sample(registry, "kgpool_requests_in_flight") == 0
    assert sample(registry, "kgpool_build_info", version=__import__("kgpool").__version__,
                  python=__import__("platform").python_version()) == 1
    # the request timeout is a histogram bucket boundary
    assert sample(registry, "kgpool_http_request_duration_seconds_bucket", notebook=nb,
                  route="/loop", method="GET", le="3.0") == 0


async def test_readiness_reflects_the_pool(aiohttp_client: ClientFactory) -> None:
    registry = CollectorRegistry()
    client = await make_client(aiohttp_client, registry, kernels=2)
    body = await (await client.get("/readyz")).json()
    assert body["status"] == "ready" and body["kernels"]["idle"] == 2
    assert sample(registry, "kgpool_kernels", notebook="kitchen", state="idle") == 2
    await client.app[MOUNTS].drain(1.0)
    resp = await client.get("/readyz")
    assert resp.status == 503 and (await resp.json())["draining"] is True
    refused = await client.get("/state")
    assert refused.status == 503 and (await refused.json())["error"] == "draining"
    assert sample(registry, "kgpool_requests_rejected_total", notebook="kitchen",
                  reason="draining") == 1
