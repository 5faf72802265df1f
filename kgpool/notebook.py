"""Notebook -> endpoints: annotation grammar, routing, REQUEST binding. Pure: text in, data out."""

from __future__ import annotations

import base64
import email.policy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.parser import BytesParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import nbformat

from .errors import NotebookError

METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")

# Comment prefix by language_info.name; anything unlisted uses "#", as Kernel Gateway does.
COMMENT_PREFIXES = {
    "scala": "//", "javascript": "//", "typescript": "//", "java": "//", "kotlin": "//",
    "groovy": "//", "go": "//", "rust": "//", "c": "//", "c++": "//", "csharp": "//",
    "c#": "//", "f#": "//", "swift": "//",
    "sql": "--", "haskell": "--", "lua": "--",
    "matlab": "%", "octave": "%", "prolog": "%", "erlang": "%",
}
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Cell:
    index: int  # position among all cells of the notebook, counted from 0
    source: str

    @property
    def first_line(self) -> str:
        return self.source.strip().splitlines()[0] if self.source.strip() else ""


@dataclass(frozen=True)
class Endpoint:
    """One method on one path: the joined cells to run and the optional ResponseInfo code."""

    method: str
    path: str
    source: str
    cells: tuple[int, ...]
    response_source: str | None = None
    response_cells: tuple[int, ...] = ()

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(name for _, name in _split_path(self.path) if name)


@dataclass(frozen=True)
class Notebook:
    name: str
    language: str
    kernel_name: str
    init_cells: tuple[Cell, ...]
    endpoints: tuple[Endpoint, ...]  # notebook order
    warnings: tuple[str, ...] = ()


def load_notebook(path: Path | str) -> Notebook:
    """Read and parse an .ipynb file; NotebookError says why it cannot be served."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise NotebookError(f"cannot read notebook {path}: {exc}") from exc
    return parse_notebook(text, name=path.stem)


def parse_notebook(text: str, name: str = "notebook") -> Notebook:
    try:
        nb = nbformat.reads(text, as_version=4)
    except Exception as exc:  # nbformat raises several unrelated types for bad input
        raise NotebookError(f"{name} is not a readable notebook: {exc}") from exc
    metadata = nb.get("metadata", {})
    language = str((metadata.get("language_info") or {}).get("name")
                   or (metadata.get("kernelspec") or {}).get("language") or "python").lower()
    kernel_name = str((metadata.get("kernelspec") or {}).get("name") or "python3")
    prefix = COMMENT_PREFIXES.get(language, "#")
    code_cells = [Cell(i, _source(c)) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    return _build(name, language, kernel_name, prefix, code_cells)


def _source(cell: Mapping[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def _annotation_patterns(prefix: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    p = re.escape(prefix)
    strict = re.compile(rf"{p}[ \t]+(ResponseInfo[ \t]+)?({'|'.join(METHODS)})[ \t]+(/.*)")
    loose = re.compile(rf"{p}[ \t]*(ResponseInfo[ \t]*)?[A-Za-z]+[ \t]+/", re.IGNORECASE)
    return strict, loose


def _build(name: str, language: str, kernel_name: str, prefix: str,
           cells: list[Cell]) -> Notebook:
    strict, loose = _annotation_patterns(prefix)
    init: list[Cell] = []
    bodies: dict[tuple[str, str], list[Cell]] = {}
    infos: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        first = cell.source.split("\n", 1)[0].rstrip()
        match = strict.match(first)
        if match is None:
            if loose.match(cell.source.lstrip()):
                raise NotebookError(
                    f"cell {cell.index} ({cell.first_line!r}): looks like an endpoint annotation "
                    f"but is not one; write '{prefix} METHOD /path' with METHOD one of "
                    f"{', '.join(METHODS)} in capitals, on the cell's first line")
            init.append(cell)
            continue
        is_info, method, path = bool(match.group(1)), match.group(2), match.group(3).strip()
        _check_path(path, cell)
        (infos if is_info else bodies).setdefault((method, path), []).append(cell)
    warnings = [f"ResponseInfo cell(s) {[c.index for c in group]} for {m} {p} have no endpoint"
                for (m, p), group in infos.items() if (m, p) not in bodies]
    if not bodies:
        raise NotebookError(
            f"{name} has no endpoint: no code cell starts with '{prefix} METHOD /path' "
            f"(METHOD one of {', '.join(METHODS)})")
    endpoints = tuple(
        Endpoint(method=m, path=p, source="\n".join(c.source for c in group),
                 cells=tuple(c.index for c in group),
                 response_source=("\n".join(c.source for c in infos[m, p])
                                  if (m, p) in infos else None),
                 response_cells=tuple(c.index for c in infos.get((m, p), ())))
        for (m, p), group in bodies.items())
    _check_shapes(endpoints)
    return Notebook(name, language, kernel_name, tuple(init), endpoints, tuple(warnings))


def _check_path(path: str, cell: Cell) -> None:
    if any(ch.isspace() for ch in path):
        raise NotebookError(f"cell {cell.index} ({cell.first_line!r}): a path may not contain "
                            "spaces")
    for _, param in _split_path(path):
        if param is not None and not _PARAM_NAME.match(param):
            raise NotebookError(
                f"cell {cell.index} ({cell.first_line!r}): ':{param}' is not a valid parameter "
                "name (letters, digits and _, not starting with a digit; one per path segment)")


def _check_shapes(endpoints: tuple[Endpoint, ...]) -> None:
    """Two spellings of one route shape (`/u/:id` and `/u/:name`) would make 405s ambiguous."""
    seen: dict[tuple[Any, ...], str] = {}
    for ep in endpoints:
        shape = tuple((lit, param is not None) for lit, param in _split_path(ep.path))
        other = seen.setdefault(shape, ep.path)
        if other != ep.path:
            raise NotebookError(f"paths {other} and {ep.path} match the same URLs; use one "
                                "spelling")


def _split_path(path: str) -> list[tuple[str, str | None]]:
    """'/a/b:id' -> [('', None), ('a', None), ('b', 'id')]: per segment a literal prefix and
    maybe a parameter."""
    parts: list[tuple[str, str | None]] = []
    for segment in path.split("/"):
        literal, colon, param = segment.partition(":")
        parts.append((literal, param if colon else None))
    return parts


@dataclass
class Route:
    """All endpoints that share one path template; matching works on decoded segments."""

    path: str
    endpoints: dict[str, Endpoint] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._segments = _split_path(self.path)

    @property
    def allowed(self) -> tuple[str, ...]:
        return tuple(self.endpoints)

    def match(self, segments: list[str]) -> dict[str, str] | None:
        if len(segments) != len(self._segments):
            return None
        params: dict[str, str] = {}
        for got, (literal, param) in zip(segments, self._segments, strict=True):
            if param is None:
                if got != literal:
                    return None
            elif len(got) > len(literal) and got.startswith(literal):
                params[param] = got[len(literal):]
            else:
                return None
        return params

    @property
    def precedence(self) -> int:
        """Fixed paths first, then deeper first parameters first (Kernel Gateway's order)."""
        for depth, (_, param) in enumerate(self._segments):
            if param is not None:
                return -depth
        return -10**6


class Router:
    """Maps a raw URL path to (Route, params); literal characters match only themselves."""

    def __init__(self, endpoints: tuple[Endpoint, ...]) -> None:
        routes: dict[str, Route] = {}
        for ep in endpoints:
            routes.setdefault(ep.path, Route(ep.path)).endpoints[ep.method] = ep
        ordered = sorted(routes.values(), key=lambda r: r.precedence)  # stable: notebook order
        self.routes = tuple(ordered)
        self._fixed = {r.path: r for r in ordered if not any(p for _, p in r._segments)}
        self._dynamic = tuple(r for r in ordered if r.path not in self._fixed)

    def match(self, raw_path: str) -> tuple[Route, dict[str, str]] | None:
        segments = [unquote(s, errors="strict") if "%" in s else s for s in raw_path.split("/")]
        fixed = self._fixed.get("/".join(segments))
        if fixed is not None and "%2f" not in raw_path.lower():
            return fixed, {}
        for route in self._dynamic:
            params = route.match(segments)
            if params is not None:
                return route, params
        return None


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
    args: dict[str, list[str]] = {}
    for name, value in data.query:
        args.setdefault(name, []).append(value)
    headers: dict[str, Any] = {}
    for name, value in data.headers:
        key = "-".join(word.capitalize() for word in name.split("-"))
        if key in headers:
            old = headers[key]
            headers[key] = (old if isinstance(old, list) else [old]) + [value]
        else:
            headers[key] = value
    document = {"body": parse_body(data.body, data.content_type), "args": args,
                "path": dict(data.params), "headers": headers}
    return json.dumps(document)


def parse_body(body: bytes, content_type: str) -> Any:
    """JSON and form bodies become data; anything else stays text (parameters are ignored)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        return _multipart_fields(body, content_type)
    text = body.decode("utf-8", errors="surrogateescape")  # invalid bytes survive the trip
    if media == "application/json" or media.endswith("+json"):
        try:
            return json.loads(text)
        except ValueError:
            return text
    if media == "application/x-www-form-urlencoded":
        fields: dict[str, list[str]] = {}
        for name, value in parse_qsl(text, keep_blank_values=True, errors="surrogateescape"):
            fields.setdefault(name, []).append(value)
        return fields
    return text


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


def bind_request(language: str, request: str) -> str:
    """Code that sets the REQUEST global to the given text, as data the text cannot escape."""
    if language == "python":
        return f"REQUEST = {request!r}\n"  # repr(str) is always a one-line, exact literal
    if language == "bash":
        return "REQUEST='" + request.replace("'", "'\\''") + "'\n"
    if language == "perl":
        return "my $REQUEST = '" + request.replace("\\", "\\\\").replace("'", "\\'") + "';\n"
    if language == "r":
        return f"REQUEST <- {json.dumps(request, ensure_ascii=False)}\n"
    return f"REQUEST = {json.dumps(request)}\n"


def swagger(served: list[tuple[str, Notebook]]) -> dict[str, Any]:
    """The Swagger 2.0 document Kernel Gateway serves at /_api/spec/swagger.json."""
    paths: dict[str, dict[str, Any]] = {}
    for prefix, notebook in served:
        for ep in notebook.endpoints:
            paths.setdefault(prefix + ep.path, {})[ep.method.lower()] = {
                "responses": {"200": {"description": "Success"}}}
    title = served[0][1].name if len(served) == 1 else "kgpool"
    return {"swagger": "2.0", "paths": paths, "info": {"version": "0.0.0", "title": title}}


_ERROR_SCHEMA = {"type": "object", "required": ["error", "message"],
                 "properties": {"error": {"type": "string"}, "message": {"type": "string"}}}


def openapi(served: list[tuple[str, Notebook]]) -> dict[str, Any]:
    """An OpenAPI 3 document for the notebooks' endpoints and kgpool's operational paths."""
    error = {"content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    paths: dict[str, dict[str, Any]] = {}
    for prefix, ep in [(prefix, ep) for prefix, nb in served for ep in nb.endpoints]:
        template = prefix + "/".join(lit + ("{" + param + "}" if param else "")
                                     for lit, param in _split_path(ep.path))
        operation: dict[str, Any] = {
            "operationId": f"{ep.method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', prefix + ep.path)}",
            "summary": f"notebook cells {', '.join(map(str, ep.cells))}",
            "parameters": [{"name": p, "in": "path", "required": True,
                            "schema": {"type": "string", "minLength": 1}} for p in ep.params],
            "responses": {
                "200": {"description": "what the cell printed (or its result as JSON)",
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                "500": {"description": "the cell raised", **error},
                "502": {"description": "the kernel died", **error},
                "503": {"description": "queue full, draining or no warm kernel", **error},
                "504": {"description": "the request's deadline passed", **error}}}
        if ep.method != "GET":
            operation["requestBody"] = {"required": False, "content": {
                "application/json": {"schema": {}},
                "application/x-www-form-urlencoded": {"schema": {"type": "object"}},
                "text/plain": {"schema": {"type": "string"}}}}
        paths.setdefault(template, {})[ep.method.lower()] = operation
    ops = {"/healthz": "the process answers", "/readyz": "at least one kernel is warm",
           "/metrics": "Prometheus metrics"}
    for path, summary in ops.items():
        paths[path] = {"get": {"operationId": path.strip("/"), "summary": summary,
                               "tags": ["operations"], "responses": {
                                   "200": {"description": "OK"},
                                   "503": {"description": "not ready", **error}}}}
    names = ", ".join(nb.name for _, nb in served)
    return {"openapi": "3.0.3",
            "info": {"title": served[0][1].name if len(served) == 1 else "kgpool",
                     "version": "0.0.0", "description": f"Endpoints of {names}, served by kgpool"},
            "paths": paths}
