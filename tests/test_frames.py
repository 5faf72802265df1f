"""The direct channel's framing and the log formatter: pure code, no kernel."""

from __future__ import annotations

import json
import logging
import struct

import pytest

from kgpool.direct import _Frames, call_frame

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


def test_the_cached_time_reads_as_loggings_own() -> None:
    from kgpool.logs import Formatter

    plain, cached = logging.Formatter(), Formatter()
    for created in (1764632681.0, 1764632681.123, 1764632681.999, 1764632682.5, 1764632681.2):
        record = logging.makeLogRecord({"msg": "x"})
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert cached.formatTime(record) == plain.formatTime(record)
        assert cached.formatTime(record, "%H") == plain.formatTime(record, "%H")
