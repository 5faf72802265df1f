"""kgpool/logs.py: the access log's records and the serve handler, against logging's own."""

from __future__ import annotations

import io
import logging

from kgpool.logs import LineHandler, RecordMaker

STANDARD_TIMES = {"created", "msecs", "relativeCreated"}


def test_a_made_record_is_what_make_record_makes() -> None:
    logger = logging.getLogger("kgpool.test-records")
    make = RecordMaker(logger, __file__)
    extra = {"request_id": "r1", "status": 200}
    ours = make(logging.INFO, "%s %d", ("GET", 200), extra)
    theirs = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "%s %d", ("GET", 200),
                               None, "access", extra)
    assert set(vars(ours)) == set(vars(theirs))
    assert {k: v for k, v in vars(ours).items() if k not in STANDARD_TIMES} == \
        {k: v for k, v in vars(theirs).items() if k not in STANDARD_TIMES}
    assert abs(ours.created - theirs.created) < 5
    assert 0 <= ours.msecs < 1000 and ours.relativeCreated > 0
    assert ours.getMessage() == "GET 200"
    debug = make(logging.DEBUG, "x", (), {})  # each level has its own template
    assert (debug.levelno, debug.levelname) == (logging.DEBUG, "DEBUG")
    assert not hasattr(debug, "request_id")  # one record's extras never reach the next


def test_the_line_handler_writes_whole_lines() -> None:
    line_buffered = io.TextIOWrapper(io.BytesIO(), line_buffering=True)
    plain = io.StringIO()
    for stream in (line_buffered, plain):
        handler = LineHandler(stream)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        record = logging.LogRecord("x", logging.WARNING, __file__, 1, "a %s", ("b",), None)
        handler.handle(record)
        handler.handle(record)
    assert line_buffered.buffer.getvalue() == b"WARNING a b\nWARNING a b\n"  # type: ignore[attr-defined]
    assert plain.getvalue() == "WARNING a b\nWARNING a b\n"
