"""The direct channel's framing and the batched log handler: pure code, no kernel."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct

import pytest

from kgpool.direct import _Frames, call_frame
from kgpool.logs import BatchedHandler

pytestmark = [pytest.mark.timeout(30), pytest.mark.channel_independent]


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


async def test_frames_split_anywhere_arrive_whole_and_in_order() -> None:
    frames = _Frames()
    wire = frame(b'{"a": 1}') + frame(b"x" * 70000) + frame(b"[]")
    for i in range(len(wire)):  # one byte at a time: every split point is crossed
        frames.data_received(wire[i:i + 1])
    assert await frames.next() == b'{"a": 1}'
    assert await frames.next() == b"x" * 70000
    assert await frames.next() == b"[]"
    pending = frames.next()
    assert not pending.done()
    frames.data_received(frame(b"late"))
    assert await pending == b"late"


async def test_an_oversized_frame_is_skipped_as_its_size_and_the_next_one_survives() -> None:
    frames = _Frames()
    frames.most = 100
    big = frame(b"y" * 5000)
    frames.data_received(big[:7])  # header and a few bytes in one chunk
    waiting = frames.next()
    for i in range(7, len(big), 999):
        frames.data_received(big[i:i + 999])
    frames.data_received(frame(b"ok"))
    assert await waiting == 5000
    assert await frames.next() == b"ok"
    assert len(frames._buffer) == 0  # nothing of the skipped frame was kept


async def test_a_waiting_call_gets_the_failure_and_so_does_every_later_one() -> None:
    frames = _Frames()
    waiting = frames.next()
    frames.connection_lost(None)
    with pytest.raises(ConnectionError):
        await waiting
    with pytest.raises(ConnectionError):
        await frames.next()


def test_call_frame_is_length_prefixed_json() -> None:
    data = call_frame(3, '{"body": "é"}')
    (size,) = struct.unpack(">I", data[:4])
    assert size == len(data) - 4
    assert json.loads(data[4:]) == {"e": 3, "r": '{"body": "é"}'}


async def test_lines_logged_together_are_written_together_in_order() -> None:
    stream = io.StringIO()
    writes: list[str] = []
    original = stream.write
    stream.write = lambda text: writes.append(text) or original(text)  # type: ignore[method-assign]
    handler = BatchedHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("t")
    logger.addHandler(handler)
    for i in range(5):
        logger.warning("line %d", i)
    assert stream.getvalue() == ""  # not yet: the batch waits for the lines after it
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not writes and loop.time() < deadline:  # the batch's timer fires on its own
        await asyncio.sleep(0.001)
    assert stream.getvalue() == "".join(f"line {i}\n" for i in range(5))
    assert len(writes) == 1


async def test_a_full_batch_is_written_without_waiting_for_its_timer() -> None:
    from kgpool.logs import FLUSH_LINES

    stream = io.StringIO()
    handler = BatchedHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("t")
    logger.addHandler(handler)
    for i in range(FLUSH_LINES):
        logger.warning("%d", i)
    done = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(done.set_result, None)  # after the flush call_soon
    await done
    assert stream.getvalue().count("\n") == FLUSH_LINES


def test_without_a_loop_lines_are_written_at_once_and_flush_writes_the_rest() -> None:
    stream = io.StringIO()
    handler = BatchedHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("t")
    logger.addHandler(handler)

    async def in_loop() -> None:
        logger.warning("from the loop")  # the loop ends before its turn does
    asyncio.run(in_loop())
    logger.warning("after")
    assert stream.getvalue() == "from the loop\nafter\n"
    asyncio.run(in_loop())
    handler.flush()  # what logging's shutdown does at exit
    assert stream.getvalue().endswith("after\nfrom the loop\n")


def test_the_cached_time_reads_as_loggings_own() -> None:
    from kgpool.logs import Formatter

    plain, cached = logging.Formatter(), Formatter()
    for created in (1764632681.0, 1764632681.123, 1764632681.999, 1764632682.5, 1764632681.2):
        record = logging.makeLogRecord({"msg": "x"})
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert cached.formatTime(record) == plain.formatTime(record)
        assert cached.formatTime(record, "%H") == plain.formatTime(record, "%H")
