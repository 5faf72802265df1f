"""A pure fold of one execution's iopub messages into an ExecutionResult."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ExecutionResult:
    """What one execute_request produced, in the order the kernel sent it."""

    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    execute_result: dict[str, Any] | None = None
    displays: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    done: bool = False
    size: int = 0  # characters of output kept; past `limit` more output only counts
    limit: int = 0  # 0: keep everything
    stderr_size: int = 0

    def feed(self, msg_type: str, content: dict[str, Any]) -> None:
        """Fold one iopub message (already filtered to this execution's msg_id)."""
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
        elif msg_type == "error":
            self.error = content
        elif msg_type == "status" and content.get("execution_state") == "idle":
            self.done = True

    @property
    def text(self) -> str:
        """The response body as Kernel Gateway builds it: stdout, else the result bundle as JSON."""
        if self.stdout:
            return "".join(self.stdout)
        if self.execute_result is not None:
            return json.dumps(self.execute_result)
        return ""


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
