"""Kernel against a real ipykernel: execution, death detection, process-group cleanup."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest
import zmq.asyncio
from conftest import alive, wait_gone

from kgpool.errors import KernelDied
from kgpool.kernel import Kernel
from kgpool.service import setup_code

# The Jupyter protocol itself: --channel does not apply.
pytestmark = [pytest.mark.timeout(60), pytest.mark.channel_independent]


@pytest.fixture
async def kernel(tmp_path) -> AsyncIterator[Kernel]:  # type: ignore[no-untyped-def]
    context = zmq.asyncio.Context()
    died: list[Kernel] = []
    k = Kernel("python3", context=context, label="test", on_death=died.append,
               ipc_dir=str(tmp_path))
    k.deaths = died  # type: ignore[attr-defined]
    await k.start()
    try:
        yield k
    finally:
        await k.shutdown()
        context.destroy(linger=0)


async def test_execute_collects_stdout_result_and_error(kernel: Kernel) -> None:
    result = await kernel.execute("print('a', end='')\nprint('b')\n40 + 2")
    assert result.text == "ab\n" and result.execute_result == {"text/plain": "42"}
    failed = await kernel.execute("raise KeyError('k')")
    assert failed.error is not None and failed.error["ename"] == "KeyError"
    assert (await kernel.execute("print('still fine')")).text == "still fine\n"


async def test_no_history_growth(kernel: Kernel) -> None:
    for _ in range(3):
        await kernel.execute("x = 1")
    result = await kernel.execute("print(len(get_ipython().history_manager.input_hist_parsed))")
    assert int(result.text) <= 1


async def test_semicolon_silences_without_history_growth(kernel: Kernel) -> None:
    setup = await kernel.execute(setup_code(os.devnull), silent=True)
    assert setup.error is None
    for _ in range(3):
        assert (await kernel.execute("40 + 2")).execute_result == {"text/plain": "42"}
        quiet = await kernel.execute("print('p')\n40 + 2;")
        assert quiet.execute_result is None and quiet.text == "p\n"
    result = await kernel.execute(
        "hm = get_ipython().history_manager\n"
        "print(len(hm.input_hist_parsed), sum(map(len, hm.outputs.values())))")
    assert result.text == "1 0\n"  # nothing stored per execution, even though ';' works


async def test_errors_reported_only_in_the_execute_reply(kernel: Kernel) -> None:
    group = await kernel.execute("raise ExceptionGroup('eg', [ValueError(1)])")
    assert group.done and group.error is not None and group.error["ename"] == "ExceptionGroup"
    magic = await kernel.execute("# GET /x\n%%timeit\n1")
    assert magic.error is not None and magic.error["ename"] == "UsageError"
    assert (await kernel.execute("1")).error is None


async def test_idle_without_an_execute_reply_is_an_error_not_a_hang(kernel: Kernel) -> None:
    await kernel.execute("async def broken(*args, **kwargs):\n    raise RuntimeError('no reply')\n"
                         "get_ipython().kernel.do_execute = broken")
    result = await asyncio.wait_for(kernel.execute("print('lost')"), 10)
    assert result.done and result.error is not None and result.error["ename"] == "KernelError"


async def test_death_mid_execution_raises_at_once(kernel: Kernel) -> None:
    started = time.monotonic()
    with pytest.raises(KernelDied):
        await kernel.execute("import os, time\ntime.sleep(0.2)\nos._exit(3)")
    assert time.monotonic() - started < 5
    assert not kernel.is_alive and kernel.exit_code == 3
    assert kernel.deaths == [kernel]  # type: ignore[attr-defined]
    with pytest.raises(KernelDied):
        await kernel.execute("1")


async def test_sigkill_while_idle_is_reported(kernel: Kernel) -> None:
    assert kernel.pid is not None
    os.kill(kernel.pid, signal.SIGKILL)
    for _ in range(100):
        if kernel.deaths:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.02)
    assert kernel.deaths == [kernel]  # type: ignore[attr-defined]


async def test_shutdown_kills_the_whole_process_group(kernel: Kernel) -> None:
    result = await kernel.execute(
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, end='')")
    child = int(result.text)
    assert alive(child)
    await kernel.shutdown()
    assert wait_gone([child, kernel.pid or 0], timeout=10) == []
