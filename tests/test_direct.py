"""The direct channel against a real Python kernel: calls, refusals, limits, death."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq.asyncio

from kgpool.direct import DirectChannel, python_setup
from kgpool.errors import KernelDied
from kgpool.kernel import Kernel

pytestmark = [pytest.mark.timeout(60), pytest.mark.channel_independent]
CELLS = [
    ("import os\nprint(REQUEST, end='')", None),
    ("x = json.loads(REQUEST)\n1 + 1", "print('{\"status\": 201}')"),
    ("import asyncio\nawait asyncio.sleep(0)", None),  # top-level await: the Jupyter channel
    ("print('y' * 200000, end='')", None),
    ("raise ValueError('bad')", None),
    ("import os\nos._exit(3)", None),
]


@pytest.fixture
async def channel(tmp_path: Path) -> AsyncIterator[DirectChannel]:
    context = zmq.asyncio.Context()
    kernel = Kernel("python3", context=context, label="direct", ipc_dir=str(tmp_path))
    await kernel.start()
    await kernel.execute(python_setup())  # what every Python kernel gets before its init cells
    await kernel.execute("import json")
    try:
        yield await DirectChannel.open(kernel, os.path.join(tmp_path, "d.sock"), CELLS)
    finally:
        await kernel.shutdown()
        context.destroy(linger=0)


async def test_a_call_binds_request_as_data(channel: DirectChannel) -> None:
    tricky = json.dumps({"body": "'); import os; os._exit(1); ('\udcff"})
    result, info = await channel.call(0, tricky)
    assert result.text == tricky and info is None


async def test_results_and_response_info(channel: DirectChannel) -> None:
    result, info = await channel.call(1, "{}")
    assert result.execute_result == {"text/plain": "2"}
    assert info is not None and info.text == '{"status": 201}\n'


async def test_cells_it_cannot_run_faithfully_are_refused(channel: DirectChannel) -> None:
    assert not channel.serves(2) and "await" in channel.refused[2]
    assert all(channel.serves(i) for i in (0, 1, 3, 4, 5))


async def test_an_oversized_reply_is_skipped_unread(channel: DirectChannel) -> None:
    result, _ = await channel.call(3, "{}", limit=1000)
    assert result.stdout == [] and result.size > 1000  # only its size was learnt
    again, _ = await channel.call(0, "ok")  # the channel is still in step
    assert again.text == "ok"


async def test_errors_come_back_as_an_execute_request_would_give_them(
        channel: DirectChannel) -> None:
    result, _ = await channel.call(4, "{}")
    assert result.error is not None
    assert (result.error["ename"], result.error["evalue"]) == ("ValueError", "bad")


async def test_a_kernel_that_dies_mid_call_raises_kernel_died(channel: DirectChannel) -> None:
    with pytest.raises(KernelDied):
        await channel.call(5, "{}")
