"""The elastic pool with real kernels: it grows while requests wait and shrinks when idle."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import NOTEBOOKS, Server, wait_for

pytestmark = pytest.mark.timeout(120)
KITCHEN = NOTEBOOKS / "kitchen.ipynb"


def test_the_pool_grows_to_meet_a_burst_and_shrinks_back(tmp_path: Path) -> None:
    with Server(KITCHEN, "--kernels", "1", "--max-kernels", "3", "--scale-up-delay", "0.05",
                "--idle-timeout", "2") as server:
        assert server.pool()["desired"] == 1
        # three requests that can only finish once all three are in cells at the same time
        with ThreadPoolExecutor(3) as ex:
            replies = list(ex.map(lambda _: server.get(f"/meet?n=3&dir={tmp_path}",
                                                       timeout=60), range(3)))
        assert [r.text.split()[0] for r in replies] == ["met"] * 3
        assert len({r.text.split()[1] for r in replies}) == 3
        assert server.metric("kgpool_pool_resizes_total", 'direction="up"') == 2
        assert server.metric("kgpool_kernels_max") == 3
        wait_for(lambda: len(server.kernel_pids()) == 1 and server.pool()["desired"] == 1,
                 timeout=30, what="the pool to shrink back to its floor")
        assert server.metric("kgpool_pool_resizes_total", 'direction="down"') == 2
        assert server.get("/state").status == 200


def test_a_fixed_pool_never_grows(tmp_path: Path) -> None:
    with Server(KITCHEN, "--kernels", "1", "--scale-up-delay", "0.01") as server:
        with ThreadPoolExecutor(2) as ex:
            slow = ex.submit(server.get, "/sleep?s=1")
            server.wait_pool("the first request to run", busy=1)
            queued = ex.submit(server.get, "/state")
            server.wait_pool("the second to wait", queued=1)
            assert slow.result().status == 200 and queued.result().status == 200
        assert len(server.kernel_pids()) == 1
        assert server.metric("kgpool_pool_resizes_total", 'direction="up"') == 0
