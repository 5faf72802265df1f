"""The log handler of `kgpool serve`: lines formatted at once, written together.

Every request logs a line; written one by one that is a write(2) per request on the event
loop, the most frequent system call after the request's own. Records logged on the event
loop's thread are formatted at once (their fields are read when they happen) and their lines
are written together, in the order they were logged, at most FLUSH_DELAY after the first of
them (or at FLUSH_LINES); records from other threads, and everything once no loop runs, are
written at once, after what is pending. flush() (logging's shutdown at exit) writes what is
pending: only a SIGKILL can lose lines, those of the last FLUSH_DELAY.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TextIO

FLUSH_DELAY = 0.02  # seconds a line from the event loop may wait for the lines after it
FLUSH_LINES = 256  # or this many lines


class SecondsCache:
    """logging.Formatter's default time (`2026-12-01 23:44:41,123`), its date and time
    formatted once a second instead of once a record."""

    converter = staticmethod(time.localtime)
    default_msec_format = "%s,%03d"

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = ""

    def __call__(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created))
        return self.default_msec_format % (self._text, record.msecs)


class Formatter(logging.Formatter):
    """logging.Formatter with the default time format cached per second."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._seconds = SecondsCache()

    def formatTime(self, record: logging.LogRecord,  # noqa: N802 (logging's name)
                   datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._seconds(record)


class BatchedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler whose lines from the event loop are written a few at a time."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._lock_pending = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:  # as logging does: a record that cannot be formatted is reported
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock_pending:
            if loop is not None:
                self._pending.append(line)
                if len(self._pending) == 1:
                    loop.call_later(FLUSH_DELAY, self.flush)
                elif len(self._pending) >= FLUSH_LINES:
                    loop.call_soon(self.flush)
                return
            lines = [*self._pending, line]
            self._pending.clear()
        self._write(lines)

    def flush(self) -> None:
        with self._lock_pending:
            lines = self._pending[:]
            self._pending.clear()
        if lines:
            self._write(lines)
        else:
            super().flush()

    def _write(self, lines: list[str]) -> None:
        self.acquire()
        try:
            self.stream.write("".join(lines))
            self.stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "".join(lines)}))
        finally:
            self.release()
