"""The REQUEST document: what a notebook sees of an HTTP request, in Kernel Gateway's shape."""

from __future__ import annotations

import base64
import email.policy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.parser import BytesParser
from typing import Any
from urllib.parse import parse_qsl


@dataclass(frozen=True)
class RequestData:
    """The parts of an HTTP request that a notebook sees, as the web layer read them."""

    body: bytes = b""
    content_type: str = ""
    query: tuple[tuple[str, str], ...] = ()
    params: Mapping[str, str] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()


def request_document(data: RequestData) -> str:
    """The REQUEST value: a JSON text with Kernel Gateway's keys, in its order."""
    return document_of(data)[0]


def document_of(data: RequestData) -> tuple[str, str | None]:
    """The REQUEST value, and a note for the log when the body is not what its Content-Type
    says (it reaches the cell anyway, as Kernel Gateway passes it: the cell then fails far
    from the cause, with a TypeError or a KeyError)."""
    args: dict[str, list[str]] = {}
    for name, value in data.query:
        args.setdefault(name, []).append(value)
    headers: dict[str, Any] = {}
    for name, value in data.headers:
        key = _HEADER_KEYS.get(name)
        if key is None:
            key = _header_key(name)
        if key in headers:
            old = headers[key]
            headers[key] = (old if isinstance(old, list) else [old]) + [value]
        else:
            headers[key] = value
    body, note = _parsed(data.body, data.content_type)
    document = {"body": body, "args": args, "path": dict(data.params), "headers": headers}
    try:
        return json.dumps(document), note
    except RecursionError:  # a body nested as deep as the parser goes, one level more here
        document["body"] = data.body.decode("utf-8", errors="surrogateescape")
        return json.dumps(document), note


_HEADER_KEYS: dict[str, str] = {}  # header names as clients send them -> as REQUEST has them


def _header_key(name: str) -> str:
    """Tornado's spelling of a header name (Content-Type), remembered: clients send the same
    few names on every request."""
    key = "-".join(word.capitalize() for word in name.split("-"))
    if len(_HEADER_KEYS) >= 4096:  # names a client makes up are not kept for ever
        _HEADER_KEYS.clear()
    _HEADER_KEYS[name] = key
    return key


def parse_body(body: bytes, content_type: str) -> Any:
    """JSON and form bodies become data; anything else stays text (parameters are ignored)."""
    return _parsed(body, content_type)[0]


def _parsed(body: bytes, content_type: str) -> tuple[Any, str | None]:
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        return _multipart_fields(body, content_type), None
    text = body.decode("utf-8", errors="surrogateescape")  # invalid bytes survive the trip
    if media == "application/json" or media.endswith("+json"):
        try:
            return json.loads(text), None
        except RecursionError:
            return text, f"the JSON body is nested too deep to parse ({media}); {_AS_TEXT}"
        except ValueError as exc:  # not JSON: text, as Kernel Gateway passes it
            return text, f"the body is not valid JSON ({media}: {exc}); {_AS_TEXT}"
    looks_json = text.lstrip()[:1] in ("{", "[")
    if media == "application/x-www-form-urlencoded":
        fields: dict[str, list[str]] = {}
        for name, value in parse_qsl(text, keep_blank_values=True, errors="surrogateescape"):
            fields.setdefault(name, []).append(value)
        return fields, (_FORM_NOT_JSON if looks_json else None)
    if looks_json and not media:
        return text, ("the body looks like JSON but came without a Content-Type: the cell "
                      "gets it as a string (send Content-Type: application/json)")
    return text, None


_AS_TEXT = "the cell gets it as a string in REQUEST['body'], as Kernel Gateway passes it"
_FORM_NOT_JSON = (
    "the body looks like JSON but came as a form (Content-Type: "
    "application/x-www-form-urlencoded, what curl -d sends unless told otherwise): the cell "
    "gets a dict of lists; send it with -H 'Content-Type: application/json'")


def _multipart_fields(body: bytes, content_type: str) -> dict[str, list[Any]]:
    """Text fields as strings; files as {filename, content_type, size, base64}."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, list[Any]] = {}
    if not message.is_multipart():
        return fields
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        raw = payload if isinstance(payload, bytes) else b""
        filename = part.get_filename()
        if filename is None:
            fields.setdefault(name, []).append(raw.decode("utf-8", errors="surrogateescape"))
        else:
            fields.setdefault(name, []).append({
                "filename": filename, "content_type": part.get_content_type(),
                "size": len(raw), "base64": base64.b64encode(raw).decode("ascii")})
    return fields
