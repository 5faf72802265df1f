"""`kgpool call NOTEBOOK "GET /path?q=1"`: one request through a temporary server, the answer
printed as `curl -i` prints it."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import quote

import aiohttp
from yarl import URL

from . import __version__
from .config import Settings
from .errors import ConfigError, KgpoolError, NotebookError
from .local import LocalServer

log = logging.getLogger(__name__)

METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
_FIELD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 field-name
# Printable ASCII is sent as given (percent escapes included); spaces and other bytes are
# percent-encoded as UTF-8, as a browser does with what is typed into its address bar.
_AS_GIVEN = "".join(chr(c) for c in range(0x21, 0x7F))

# serve's settings that `call` takes (flags and KGPOOL_* variables); the rest keep defaults
CALL_SETTINGS = frozenset({
    "kernel_name", "strict", "comment_prefix", "base_url", "static_path",
    "allow_notebook_download", "timeout", "init_timeout", "channel", "transport",
    "allow_unverified_language", "max_response_size", "max_body_size", "allow_origin",
    "allow_methods", "allow_headers", "expose_headers", "max_age", "allow_credentials",
    "expose_traceback", "log_format", "log_level"})
CALL_HELP = """\
Start the notebook on one kernel, send one request to it through kgpool's HTTP server (the
answer is what `kgpool serve` would give), print the answer as `curl -i` does (status line,
headers, a blank line, the body) and shut everything down. The server's log (init cells that
fail, warnings) goes to stderr; --log-level info shows more. No token is needed: the server
listens on a free 127.0.0.1 port for this one request.

exit status: 0 for a 1xx-3xx answer, 4 for 4xx, 5 for 5xx, 1 when the kernel could not be
warmed (an init cell failed, the kernel died), 2 for a notebook or an option kgpool cannot
serve, 130 when interrupted (128 + the signal's number for SIGTERM and SIGHUP); the
kernel is shut down in every case.

examples:
  kgpool call convert.ipynb "GET /convert?angle=180"
  kgpool call model.ipynb "POST /predict" -d '{"rows": [[1, 2]]}'
  kgpool call model.ipynb "POST /predict" -d @rows.csv -H "Content-Type: text/csv"
  kgpool call plots.ipynb /plot --body-only > plot.png
"""

# Exit statuses
OK, START_FAILED, UNUSABLE, CLIENT_ERROR, SERVER_ERROR, INTERRUPTED = 0, 1, 2, 4, 5, 130


@dataclass(frozen=True)
class Call:
    """One request as the command line gave it."""

    method: str
    target: str  # path and query, percent-encoded
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None


@dataclass
class Answer:
    version: str
    status: int
    reason: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def head(self) -> bytes:
        """The status line and headers, as the server sent them, and the blank line."""
        lines = [f"HTTP/{self.version} {self.status} {self.reason}".encode("latin-1")]
        lines += [name + b": " + value for name, value in self.headers]
        return b"\n".join(lines) + b"\n\n"

    @property
    def exit_status(self) -> int:
        return OK if self.status < 400 else CLIENT_ERROR if self.status < 500 else SERVER_ERROR


def add_call_parser(sub: Any, add_setting_flags: Callable[[argparse.ArgumentParser], None]
                    ) -> None:
    """`kgpool call`'s own arguments; `add_setting_flags` adds serve's (CALL_SETTINGS)."""
    call = sub.add_parser(
        "call", help="run one request through a temporary pool and print the answer",
        description=CALL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    call.add_argument("notebook", metavar="NOTEBOOK",
                      help="the notebook (.ipynb), a folder of them, or FILE=/prefix")
    call.add_argument("request", metavar="REQUEST",
                      help='"METHOD /path?query", e.g. "GET /convert?angle=180" (a bare path '
                           'is a GET, or a POST with --data)')
    call.add_argument("-d", "--data", metavar="BODY",
                      help="the request body; @FILE reads a file, @- stdin. Its Content-Type "
                           "is application/json when it is JSON, else text/plain, unless a "
                           "--header sets one")
    call.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                      help="a request header (repeatable)")
    call.add_argument("--body-only", action="store_true",
                      help="print the body alone, e.g. to save an image: --body-only > x.png")
    add_setting_flags(call)
    for action in call._actions:  # serve's help says info; a call shows warnings and errors
        if action.dest == "log_level":
            action.help = "log level (default: warning) [env KGPOOL_LOG_LEVEL]"


def parse_call(request: str, data: str | None = None, headers: list[str] | None = None,
               stdin: BinaryIO | None = None) -> Call:
    """ "GET /convert?angle=180" (a bare path is a GET, or a POST with data), -d/--data
    (`@file`, `@-` for stdin) and -H 'Name: value' headers -> a Call; ConfigError for
    anything unusable."""
    words = request.split(None, 1)
    if len(words) == 1:  # as curl: a body makes it a POST
        words = ["GET" if data is None else "POST", *words]
    if len(words) != 2 or not words[1].strip().startswith("/"):
        raise ConfigError(f"the request should look like \"GET /path?name=value\", not "
                          f"{request!r}")
    method, target = words[0].upper(), words[1].strip()
    if method not in METHODS:
        raise ConfigError(f"{words[0]!r} is not an HTTP method kgpool serves "
                          f"({', '.join(METHODS)})")
    pairs = tuple(_header(text) for text in headers or ())
    body = None if data is None else _body(data, stdin or sys.stdin.buffer)
    if body is not None and not any(name.lower() == "content-type" for name, _ in pairs):
        pairs += (("Content-Type", _guess_type(body)),)
    return Call(method, quote_target(target), pairs, body)


def quote_target(target: str) -> str:
    """A path and query to send: printable ASCII as given, anything else percent-encoded."""
    return quote(target, safe=_AS_GIVEN)


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not _FIELD.match(name.strip()):
        raise ConfigError(f"-H wants 'Name: value', not {text!r}")
    if any(ch in value for ch in "\r\n\0"):
        raise ConfigError(f"-H {name.strip()}: a header value cannot hold a line break")
    return name.strip(), value.strip()


def _body(data: str, stdin: BinaryIO) -> bytes:
    if data == "@-":
        return stdin.read()
    if data.startswith("@"):
        try:
            with open(data[1:], "rb") as file:
                return file.read()
        except OSError as exc:
            raise ConfigError(f"-d {data}: cannot read it: {exc.strerror}") from None
    return data.encode("utf-8", "surrogateescape")


def _guess_type(body: bytes) -> str:
    """JSON when the body is JSON, else plain text (curl would say it is a form)."""
    try:
        json.loads(body)
    except ValueError:
        return "text/plain; charset=utf-8"
    return "application/json"


async def send(server: LocalServer, call: Call) -> Answer:
    """The call, over HTTP to the server, as a client sends it; the answer read whole."""
    headers = {"User-Agent": f"kgpool/{__version__} (kgpool call)", "Accept": "*/*"}
    headers.update(call.headers)
    async with aiohttp.ClientSession(auto_decompress=False,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        async with session.request(
                call.method, URL(server.origin + call.target, encoded=True), data=call.body,
                headers=headers, allow_redirects=False,
                skip_auto_headers=("Accept-Encoding", "Content-Type")) as resp:
            body = await resp.read()
            return Answer(f"{resp.version.major}.{resp.version.minor}" if resp.version
                          else "1.1", resp.status, resp.reason or "",
                          list(resp.raw_headers), body)


async def run(settings: Settings, call: Call, out: BinaryIO, body_only: bool = False) -> int:
    """Serve the notebook on one kernel, send the call, print the answer, shut everything
    down; the exit status (see README: 0 for 1xx-3xx, 4 and 5 for 4xx and 5xx answers, 1
    when no kernel warms, 2 for a notebook or setting kgpool cannot serve)."""
    try:
        async with LocalServer(settings) as server:
            answer = await send(server, call)
    except (NotebookError, ConfigError) as exc:
        _say(f"error: {exc}")
        return UNUSABLE
    except KgpoolError as exc:
        _say(f"cannot start: {exc}")
        return START_FAILED
    except OSError as exc:
        _say(f"cannot serve the notebook: {exc}")
        return START_FAILED
    except aiohttp.ClientError as exc:
        _say(f"the request failed: {exc}")
        return SERVER_ERROR
    if not body_only:
        out.write(answer.head())
    out.write(answer.body)
    out.flush()
    return answer.exit_status


def _say(message: str) -> None:
    print(f"kgpool call: {message}", file=sys.stderr)


def main(settings: Settings, call: Call, body_only: bool = False) -> int:
    """Ctrl-C, SIGTERM and SIGHUP stop the call; the kernel is shut down first."""
    stopped_by: list[signal.Signals] = []

    async def stoppable() -> int:
        task, loop = asyncio.current_task(), asyncio.get_running_loop()
        assert task is not None

        def stop(signum: signal.Signals) -> None:
            stopped_by.append(signum)
            task.cancel()
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, stop, signum)
        return await run(settings, call, sys.stdout.buffer, body_only)
    try:
        return asyncio.run(stoppable())
    except KeyboardInterrupt:  # asyncio.run cancelled the call; the kernel is shut down
        _say("interrupted")
        return INTERRUPTED
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        _say(f"stopped by {stopped_by[0].name}")
        return 128 + stopped_by[0]
