"""A pure fold of one execution's messages (iopub, then its execute_reply): an ExecutionResult."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

# What an execution that went idle without an execute_reply reports (ipykernel sends none when
# its own handler fails, e.g. on an exception whose str() raises).
NO_REPLY = {"ename": "KernelError", "evalue": "the kernel finished without an execute_reply "
            "(its message handler failed; see the kernel's log)", "traceback": []}


@dataclass
class ExecutionResult:
    """What one execute_request produced, in the order the kernel sent it.

    Done once both the idle status (iopub) and the execute_reply (shell) arrived, as nbclient
    waits; an error the kernel reports only in the reply (an ExceptionGroup, a UsageError)
    counts as the error; an iopub error message takes precedence over it.
    """

    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    execute_result: dict[str, Any] | None = None
    displays: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    idle: bool = False
    replied: bool = False
    size: int = 0  # characters of output kept; past `limit` more output only counts
    limit: int = 0  # 0: keep everything
    stderr_size: int = 0
    expressions: dict[str, Any] = field(default_factory=dict)  # the reply's user_expressions
    answers: Any = None  # a batched cell's RESPONSES, encoded in the kernel (_inkernel_io)
    _clear_pending: bool = field(default=False, repr=False)
    _error_from_reply: bool = field(default=False, repr=False)

    @property
    def done(self) -> bool:
        return self.idle and self.replied

    def feed(self, msg_type: str, content: dict[str, Any]) -> None:
        """Fold one iopub message (already filtered to this execution's msg_id)."""
        if msg_type == "status":
            if content.get("execution_state") == "idle":
                self.idle = True
            return
        if self._clear_pending and msg_type in _OUTPUTS:
            self.displays.clear()  # clear_output(wait=True) applies at the next output
            self._clear_pending = False
        if msg_type == "stream":
            text = content.get("text", "")
            if content.get("name") == "stderr":  # never the body
                self.stderr_size += len(text)
                if not self.limit or self.stderr_size <= self.limit:
                    self.stderr.append(text)
                return
            self.size += len(text)
            if not self.limit or self.size <= self.limit:
                self.stdout.append(text)
        elif msg_type in ("execute_result", "display_data", "update_display_data"):
            data = content.get("data", {})
            self.size += sum(len(v) for v in data.values() if isinstance(v, str))
            if self.limit and self.size > self.limit:
                return  # only counted: the answer will be refused as too large
            if msg_type == "execute_result":
                self.execute_result = data
            else:
                self.displays.append(data)
        elif msg_type == "clear_output":
            # What the notebook shows: earlier displays are gone. stdout stays the body as
            # Kernel Gateway gives it (it ignores clear_output).
            if content.get("wait"):
                self._clear_pending = True
            else:
                self.displays.clear()
        elif msg_type == "error":  # the last one wins, as in Kernel Gateway
            self.error = content
            self._error_from_reply = False

    def reply(self, content: dict[str, Any] | None) -> None:
        """Fold the execute_reply (None: the kernel went idle without sending one)."""
        self.replied = True
        if content is not None:
            self.expressions = content.get("user_expressions") or {}
        if self.error is not None:
            return
        if content is None:
            self.error = dict(NO_REPLY)
        elif content.get("status", "ok") == "aborted":
            self.error = {"ename": "ExecutionAborted", "traceback": [],
                          "evalue": "the kernel aborted the request after an earlier error"}
        elif content.get("status", "ok") != "ok":
            self.error = {"ename": str(content.get("ename", "Error")),
                          "evalue": str(content.get("evalue", "")),
                          "traceback": list(content.get("traceback") or [])}
        else:
            return
        self._error_from_reply = True

    @property
    def text(self) -> str:
        """The response body as Kernel Gateway builds it: stdout, else the result bundle as JSON."""
        if self.stdout:
            return "".join(self.stdout)
        if self.execute_result is not None:
            return json.dumps(self.execute_result)
        return ""


_OUTPUTS = frozenset({"stream", "execute_result", "display_data", "update_display_data", "error"})


# Mimetypes whose display data is base64 in Jupyter messages, and what a rich body prefers.
BINARY_MIMES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp",
                          "application/pdf", "application/octet-stream"})
PREFERENCE = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/svg+xml",
              "application/pdf", "application/octet-stream", "text/html", "application/json",
              "text/markdown", "text/latex", "text/plain")


def choose_body(result: ExecutionResult, asked: str | None = None) -> tuple[bytes, str | None]:
    """(body, content type or None for the default) by kgpool's rule:

    1. an output carrying the mimetype the response asks for (ResponseInfo's Content-Type);
    2. stdout, as Kernel Gateway does;
    3. the last display output (Kernel Gateway ignores these), its richest mimetype;
    4. an execute_result carrying an image (or bytes, or a PDF) as that content;
    5. any other execute_result as its mime bundle in JSON, as Kernel Gateway does.
    """
    bundles = result.displays + ([result.execute_result] if result.execute_result else [])
    if asked and asked != "text/plain":  # every bundle has text/plain: that asks for nothing
        for bundle in reversed(bundles):
            if asked in bundle:
                return _content(bundle[asked], asked), None
    if result.stdout:
        return encode_text(result.text), None
    if result.displays:
        bundle = result.displays[-1]
        for mime in PREFERENCE:
            if mime in bundle:
                return _content(bundle[mime], mime), _content_type(mime)
    if result.execute_result:
        for mime in PREFERENCE:
            if (mime in BINARY_MIMES or mime.startswith("image/")) and \
                    mime in result.execute_result:
                return _content(result.execute_result[mime], mime), _content_type(mime)
        return encode_text(result.text), None
    return b"", None


def encode_text(text: str) -> bytes:
    """UTF-8, giving back the exact bytes of any request data that was not UTF-8."""
    try:
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:  # lone surrogates that did not come from undecodable bytes
        return text.encode("utf-8", errors="replace")


def _content(data: Any, mime: str) -> bytes:
    if mime in BINARY_MIMES and isinstance(data, str):
        return base64.b64decode(data)
    if isinstance(data, (dict, list)):
        return json.dumps(data).encode()
    return encode_text(data if isinstance(data, str) else str(data))


def _content_type(mime: str) -> str:
    return f"{mime}; charset=utf-8" if mime.startswith("text/") or mime == "image/svg+xml" \
        else mime
