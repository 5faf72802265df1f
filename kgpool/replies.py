"""An execution's results -> the Reply to send: status and headers from ResponseInfo, checked so
that nothing a cell prints can break HTTP framing; the body by outputs.choose_body."""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import BatchError, ExecutionError, ResponseInfoError, ResponseTooLarge
from .outputs import ExecutionResult, choose_body, encode_text

log = logging.getLogger(__name__)

NO_BODY_STATUSES = frozenset({204, 304})
# The server frames the answer itself: a cell's framing or hop-by-hop header would desync the
# connection (a wrong Content-Length leaves stray bytes on a keep-alive connection).
DROPPED_HEADERS = frozenset({
    "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
    "proxy-connection", "te", "trailer", "proxy-authenticate", "proxy-authorization"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 field-name
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # controls other than HTAB


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "text/plain"})
    body: bytes = b""


Tidy = Callable[[str, str], tuple[str, str]]  # a language's (ename, evalue) as clients read them


def _as_is(ename: str, evalue: str) -> tuple[str, str]:
    return ename or "Error", evalue


# A SyntaxError's message ends with the file it was compiled as: ipykernel's hash-named one
_CODE_FILE = re.compile(r"\((?:[^()\n]*\.py|<[^<>\n]*>), line (\d+)\)$")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # a traceback's colours
_HIDDEN = re.compile(r"^\s*(?:\x1b\[[0-9;]*m)*\[\.\.\. skipping hidden \d+ frame")


def execution_error(error: dict[str, Any], tidy: Tidy = _as_is,
                    cell: str = "") -> ExecutionError:
    """The error a cell's failure becomes; `cell` names the notebook cell(s) that ran: a
    syntax error's message says `(cell 4 ('# GET /x'), line 2)` instead of a file name."""
    ename, evalue = tidy(str(error.get("ename") or ""), str(error.get("evalue", "")))
    if cell and ename in ("SyntaxError", "IndentationError", "TabError"):
        evalue = _CODE_FILE.sub(lambda m: f"({cell}, line {m.group(1)})", evalue)
    traceback = [str(entry) for entry in error.get("traceback", [])
                 if not _HIDDEN.match(str(entry))]  # kgpool's own frames, hidden
    return ExecutionError(ename, evalue, traceback, cell)


def build_reply(result: ExecutionResult, info: ExecutionResult | None,
                max_size: int = 0, tidy: Tidy = _as_is, cells: tuple[str, str] = ("", "")
                ) -> Reply:
    """The Reply for an endpoint's result and its ResponseInfo result; raises ExecutionError
    if a cell failed, ResponseInfoError for an unusable ResponseInfo, ResponseTooLarge past
    `max_size` bytes (0: no limit). `cells`: the names of the endpoint's cells and of its
    ResponseInfo's (Endpoint.names)."""
    if result.error is not None:
        raise execution_error(result.error, tidy, cells[0])
    reply = Reply()
    asked = None
    if info is not None:
        if info.error is not None:
            raise execution_error(info.error, tidy, cells[1])
        if apply_response_info(reply, info.text):
            asked = next(v for k, v in reply.headers.items()
                         if k.lower() == "content-type").split(";")[0].strip().lower()
    if max_size and result.size > max_size:
        raise ResponseTooLarge(f"the response is larger than {max_size} bytes "
                               "(--max-response-size)")
    reply.body, content_type = choose_body(result, asked)
    if max_size and len(reply.body) > max_size:
        raise ResponseTooLarge(f"the response is {len(reply.body)} bytes, more than "
                               f"{max_size} (--max-response-size)")
    if content_type is not None and asked is None:
        reply.headers["Content-Type"] = content_type
    if reply.status in NO_BODY_STATUSES:
        reply.body = b""
    return reply


def apply_response_info(reply: Reply, text: str) -> bool:
    """A ResponseInfo cell prints {"status": int, "headers": {...}}; anything else is an error.
    True if it set the Content-Type."""
    try:
        info = json.loads(text)
    except (ValueError, RecursionError):
        raise ResponseInfoError(f"ResponseInfo printed no JSON object: {text[:200]!r}") from None
    if not isinstance(info, dict):
        raise ResponseInfoError("ResponseInfo must print a JSON object")
    status = info.get("status", 200)
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        raise ResponseInfoError(f"ResponseInfo status must be an integer 200..599, not "
                                f"{status!r}")
    headers = info.get("headers", {})
    if not isinstance(headers, dict):
        raise ResponseInfoError("ResponseInfo headers must be a JSON object")
    reply.status = status
    set_type = False
    for name, value in headers.items():
        name, value = _checked(name, value)
        if name.lower() in DROPPED_HEADERS:
            log.warning("ResponseInfo header %s dropped: kgpool frames the answer itself", name)
            continue
        for existing in [k for k in reply.headers if k.lower() == name.lower()]:
            del reply.headers[existing]
        reply.headers[name] = value
        set_type = set_type or name.lower() == "content-type"
    return set_type


def _checked(name: Any, value: Any) -> tuple[str, str]:
    if not isinstance(name, str) or not _TOKEN.match(name):
        raise ResponseInfoError(f"ResponseInfo header name {str(name)[:80]!r} is not a valid "
                                "HTTP field name")
    if not isinstance(value, (str, int, float)):  # bool is an int: "True", as tornado writes it
        raise ResponseInfoError(f"ResponseInfo header {name} must be a string or a number")
    text = str(value).strip(" \t")  # optional whitespace is not part of a field value
    if _BAD_VALUE.search(text):
        raise ResponseInfoError(f"ResponseInfo header {name} has a control character (a line "
                                "break, NUL...) in its value")
    return name, text


def batch_replies(result: ExecutionResult, info: ExecutionResult | None, count: int,
                  max_size: int = 0, tidy: Tidy = _as_is, cells: tuple[str, str] = ("", "")
                  ) -> list[Reply | Exception]:
    """One Reply (or that request's own error) per request of a batch. The cell answers in
    RESPONSES (kgpool/_inkernel_io.py encodes each item) or prints a JSON list; ResponseInfo
    gives every answer its status and headers first. Raises (for the whole batch) if the cell
    failed or its answers do not fit the batch."""
    if result.error is not None:
        raise execution_error(result.error, tidy, cells[0])
    base = Reply()
    if info is not None:
        if info.error is not None:
            raise execution_error(info.error, tidy, cells[1])
        apply_response_info(base, info.text)
    answers = result.answers
    if isinstance(answers, dict):
        raise BatchError(str(answers.get("invalid", "RESPONSES is not a list")))
    if answers is None:
        try:
            printed = json.loads(result.text)
        except (ValueError, RecursionError):
            printed = None
        if not isinstance(printed, list):
            raise BatchError("a batched cell sets RESPONSES (a list, one answer per request in "
                             "REQUESTS) or prints a JSON list")
        answers = [{"body": {"text": item} if isinstance(item, str) else
                    {"json": json.dumps(item)}} for item in printed]
    if len(answers) != count:
        raise BatchError(f"the batch of {count} request(s) got {len(answers)} answer(s)")
    return [_one(base, answer, max_size, cells[0]) for answer in answers]


def _one(base: Reply, answer: dict[str, Any], max_size: int, cell: str) -> Reply | Exception:
    if "error" in answer:
        ename, evalue = answer["error"]
        return ExecutionError(str(ename), str(evalue), cell=cell)
    reply = Reply(base.status, dict(base.headers))
    try:
        if "status" in answer or "headers" in answer:
            apply_response_info(reply, json.dumps({"status": answer.get("status", base.status),
                                                   "headers": answer.get("headers", {})}))
    except (ResponseInfoError, TypeError, ValueError) as exc:
        return exc if isinstance(exc, ResponseInfoError) else ResponseInfoError(str(exc))
    body = answer.get("body") or {}
    if "b64" in body:
        reply.body = base64.b64decode(body["b64"])
        if not any(k.lower() == "content-type" for k in (answer.get("headers") or {})):
            reply.headers["Content-Type"] = "application/octet-stream"
    else:
        reply.body = encode_text(body.get("text", body.get("json", "")))
    if max_size and len(reply.body) > max_size:
        return ResponseTooLarge(f"the answer is {len(reply.body)} bytes, more than {max_size} "
                                "(--max-response-size)")
    if reply.status in NO_BODY_STATUSES:
        reply.body = b""
    return reply


def traceback_text(error: ExecutionError, most: int = 20000) -> str:
    """A cell's traceback for the log: as a notebook shows it, without colours, indented."""
    text = "\n".join(ANSI.sub("", entry).rstrip("\n") for entry in error.traceback).strip()
    if len(text) > most:
        text = text[:most // 2] + "\n[... traceback cut ...]\n" + text[-most // 2:]
    return "\n" + indent(text) if text else ""


def indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip("\n").splitlines())
