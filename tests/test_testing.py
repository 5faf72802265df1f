"""kgpool.testing, used the way a user's test suite would use it: real kernels in this process's
event loop; kernels gone after the block whatever ends it; the README's example runs as is."""

from __future__ import annotations

import asyncio
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import EXAMPLE, NOTEBOOKS, ROOT, alive, kernel_children, wait_gone

import kgpool.testing
from kgpool.errors import ConfigError, InitError, NotebookError

pytestmark = pytest.mark.timeout(120)

KITCHEN = NOTEBOOKS / "kitchen.ipynb"
CHANNEL = os.environ.get("KGPOOL_CHANNEL", "direct")  # tests/run.sh's second pass


def kernels() -> list[int]:
    return kernel_children(os.getpid())


def still_running(pids: list[int]) -> list[int]:
    """Of `pids`, those alive now: leaving the block waits until its kernels are gone."""
    return [pid for pid in pids if alive(pid)]


async def until(predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.02)


async def test_get_post_and_the_response() -> None:
    async with kgpool.testing.serve(KITCHEN, kernels=2, channel=CHANNEL) as client:
        assert len(kernels()) == 2  # warm before the block starts
        resp = await client.get("/echo", params={"word": "hé llo", "n": "1"})
        assert resp.status == 200 and resp.reason == "OK"
        assert resp.headers["content-type"] == "text/plain"  # case-insensitive
        assert resp.json()["args"] == {"word": ["hé llo"], "n": ["1"]}

        resp = await client.post("/echo", json={"a": [1, 2]}, headers={"X-Thing": "yes"})
        request = resp.json()
        assert request["body"] == {"a": [1, 2]}
        assert request["headers"]["Content-Type"] == "application/json"
        assert request["headers"]["X-Thing"] == "yes"

        resp = await client.put("/echo", data="plain words")
        assert resp.json()["body"] == "plain words"

        resp = await client.get("/raise")
        assert resp.status == 500
        assert resp.json()["error"] == "ValueError"
        assert resp.content_type == "application/json"

        resp = await client.get("/no/such/path")
        assert resp.status == 404
        assert client.url.startswith("http://127.0.0.1:")
    assert wait_gone(kernels()) == []


async def test_options_are_serve_settings_and_headers_go_with_every_request() -> None:
    async with kgpool.testing.serve(KITCHEN, channel=CHANNEL, auth_token="s3cret",
                                    timeout=1, base_url="/v1",
                                    headers={"Authorization": "Bearer s3cret"}) as client:
        assert client.url.endswith("/v1")
        resp = await client.get("/hello/world")
        assert (resp.status, resp.text) == (200, "fixed")
        resp = await client.get("/sleep", params={"s": "5"})
        assert resp.status == 504
        resp = await client.get("/hello/world", headers={"Authorization": "Bearer wrong"})
        assert resp.status == 401
    assert wait_gone(kernels()) == []


async def test_a_notebook_that_cannot_be_served_raises_at_once() -> None:
    with pytest.raises(NotebookError, match="has no endpoint"):
        async with kgpool.testing.serve(NOTEBOOKS / "no_endpoints.ipynb"):
            pytest.fail("entered")
    with pytest.raises(ConfigError, match="--timeout must not be negative"):
        async with kgpool.testing.serve(KITCHEN, timeout=-1):
            pytest.fail("entered")
    with pytest.raises(InitError, match=r"init cell 2 \('x = 1'\) raised ZeroDivisionError"):
        async with kgpool.testing.serve(NOTEBOOKS / "init_fails.ipynb", kernels=2,
                                        channel=CHANNEL):
            pytest.fail("entered")
    assert wait_gone(kernels()) == []


async def test_kernels_shut_down_when_the_test_body_raises() -> None:
    with pytest.raises(AssertionError, match="the test failed"):
        async with kgpool.testing.serve(KITCHEN, kernels=2, channel=CHANNEL):
            seen = kernels()
            assert len(seen) == 2
            raise AssertionError("the test failed")
    assert still_running(seen) == []
    assert kernels() == []


async def test_kernels_shut_down_when_the_test_is_cancelled_mid_request() -> None:
    """Cancelled (as a timeout cancels a test) while a request runs in the kernel, and
    cancelled again and again while it cleans up: the kernels are still all shut down."""
    clients: list[kgpool.testing.Client] = []
    seen: list[int] = []

    async def test_body() -> None:
        async with kgpool.testing.serve(KITCHEN, channel=CHANNEL) as client:
            clients.append(client)
            seen.extend(kernels())
            await client.get("/sleep", params={"s": "60"})

    task = asyncio.create_task(test_body())

    async def running() -> bool:
        if task.done():
            task.result()
        if not clients:
            return False
        resp = await clients[0].get("/_kgpool/readyz")
        return bool(resp.json()["kernels"]["busy"] == 1)
    await until(running, "the request to be running in the kernel")
    task.cancel()

    async def cleaning_up() -> bool:
        return clients[0].server.closing
    await until(cleaning_up, "the block to start shutting the server down")
    assert not task.done()

    async with asyncio.timeout(30):
        while not task.done():  # cancelled again at every step of its clean-up
            task.cancel()
            await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(seen) == 1
    assert still_running(seen) == []


async def test_kernels_shut_down_when_cancelled_during_warm_up() -> None:
    task = asyncio.create_task(kgpool.testing.serve(
        NOTEBOOKS / "init_sleeps.ipynb", kernels=2, channel=CHANNEL).__aenter__())

    async def started() -> bool:
        assert not task.done()
        return len(kernels()) == 2
    await until(started, "both kernels to start")
    seen = kernels()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert still_running(seen) == []


def readme_example() -> tuple[str, str]:
    """The README testing section's pytest.ini and test file."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Testing your notebook API\n", 1)[1].split("\n## ", 1)[0]
    ini = re.search(r"```ini\n(.*?)```", section, re.S)
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert ini and code, "the README's testing section lost its pytest.ini or its example"
    return ini.group(1), code.group(1)


@pytest.mark.channel_independent
def test_the_readme_example_runs_as_written() -> None:
    """The README's test file, next to a copy of the example notebook, run by pytest as a user
    runs it (no kgpool configuration): it passes, and a broken notebook makes it fail."""
    ini, example = readme_example()
    assert "kgpool.testing.serve" in example
    with tempfile.TemporaryDirectory(prefix="kgpool-test-readme-") as folder:
        here = Path(folder)
        (here / "pytest.ini").write_text(ini)
        (here / "test_convert.py").write_text(example)
        (here / "convert.ipynb").write_bytes(EXAMPLE.read_bytes())
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}

        def pytest_run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error",
                 "test_convert.py"], cwd=here, env=env, capture_output=True, text=True,
                timeout=100, stdin=subprocess.DEVNULL)
        passed = pytest_run()
        assert passed.returncode == 0, passed.stdout + passed.stderr
        assert re.search(r"\b[2-9] passed\b", passed.stdout), passed.stdout

        # The same tests against a notebook that answers wrongly: they must fail.
        (here / "convert.ipynb").write_text(EXAMPLE.read_text().replace(
            "math.radians(float(angle))", "float(angle)"))
        failed = pytest_run()
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert f"{math.pi}" in failed.stdout or "convertedAngle" in failed.stdout


HANGING_TEST = """
import pathlib
import pytest
import kgpool.testing

HERE = pathlib.Path(__file__).parent


@pytest.mark.timeout(6)  # room for the warm-up on a loaded machine
async def test_hangs():
    async with kgpool.testing.serve(HERE / "kitchen.ipynb", channel=%r) as client:
        (HERE / "entered").touch()
        await client.get("/sleep", params={"s": "60"})
"""


@pytest.mark.channel_independent
def test_a_pytest_timeout_still_shuts_the_kernels_down() -> None:
    """pytest-timeout (its default, signal method) stops a hanging test: the kernel it had
    is gone by the time pytest exits, none is left orphaned."""
    ini, _ = readme_example()
    with tempfile.TemporaryDirectory(prefix="kgpool-test-timeout-") as folder:
        here = Path(folder)
        (here / "pytest.ini").write_text(ini)
        (here / "test_hang.py").write_text(HANGING_TEST % CHANNEL)
        (here / "kitchen.ipynb").write_bytes(KITCHEN.read_bytes())
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 "test_hang.py"], cwd=here, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seen: set[int] = set()
        try:
            deadline = time.monotonic() + 90
            while proc.poll() is None and time.monotonic() < deadline:
                seen |= set(kernel_children(proc.pid))
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
            output = proc.communicate()[0].decode(errors="replace")
        entered = (here / "entered").exists()
    assert "Timeout" in output and "1 failed" in output, output
    assert entered, output  # the timeout struck with a request in the kernel
    # (pytest-asyncio then cancels every task at once: the pool may start a replacement for
    # the cancelled request's kernel before the block closes it; it must be gone too)
    assert seen, output
    assert still_running(sorted(seen)) == [] and kernel_children(proc.pid) == []
