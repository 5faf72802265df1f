"""Logging for `kgpool serve`: logging's own format with its time made once a second, a handler
that writes each line once, and cheap records for the access log.

Lines are written as they are logged (a write(2) each): a line that says why a request failed
is in the log before its answer reaches the client, which tools and tests that read the log
right after an answer rely on. Batching them saved about 1% of the server's CPU per request;
not worth that.
"""

from __future__ import annotations

import logging
import time


class Formatter(logging.Formatter):
    """logging.Formatter whose default time (its default_time_format and default_msec_format,
    `2026-12-01 23:44:41,123`) has its date and time formatted once a second, not per record."""

    _second: int | None = None
    _text = ""

    def formatTime(self, record: logging.LogRecord,  # noqa: N802 (logging's name)
                   datefmt: str | None = None) -> str:
        if datefmt is not None or self.default_msec_format is None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._text = time.strftime(self.default_time_format, self.converter(record.created))
        return self.default_msec_format % (self._text, record.msecs)


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that leaves flushing to a line-buffered stream (stderr is one): one
    write per record, without a second locked flush call."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = self.stream
        if not getattr(stream, "line_buffering", False):
            super().emit(record)
            return
        try:
            stream.write(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class RecordMaker:
    """Records for a hot path (the access log), as logger.makeRecord makes them, but from a
    template of the fields that do not change between them (logger, level, origin, thread
    and process, as the first record saw them): only the time, message and extras are set
    per record."""

    def __init__(self, logger: logging.Logger, origin: str) -> None:
        self.logger = logger
        self.origin = origin
        self._templates: dict[int, dict[str, object]] = {}

    def __call__(self, level: int, msg: str, args: tuple[object, ...],
                 extra: dict[str, object]) -> logging.LogRecord:
        template = self._templates.get(level)
        if template is None:
            template = self._templates[level] = dict(vars(self.logger.makeRecord(
                self.logger.name, level, self.origin, 0, "", (), None, "access")))
        record = _new_record(logging.LogRecord)
        fields = record.__dict__
        fields.update(template)
        created = time.time()  # as LogRecord.__init__ derives them
        fields["created"] = created
        fields["msecs"] = int((created - int(created)) * 1000) + 0.0
        fields["relativeCreated"] = (created - _START) * 1000
        fields["msg"], fields["args"] = msg, args
        fields.update(extra)
        return record


_new_record = logging.LogRecord.__new__
_START = logging._startTime  # type: ignore[attr-defined]  # what relativeCreated counts from
