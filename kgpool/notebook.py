"""Notebook -> init cells and endpoints: the annotation grammar. Pure: text in, data out."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from .errors import NotebookError
from .languages import comment_prefixes

METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
# Words that make a comment look like an annotation that went wrong (any case).
_VERBS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")


@dataclass(frozen=True)
class Cell:
    index: int  # position among all cells of the notebook, counted from 0
    source: str

    @property
    def number(self) -> int:
        """The cell's number as a notebook user counts it: from 1, markdown cells included."""
        return self.index + 1

    @property
    def first_line(self) -> str:
        return self.source.strip().splitlines()[0] if self.source.strip() else ""

    @property
    def name(self) -> str:
        """How messages name the cell: `cell 3 ('# GET /x')`."""
        return f"cell {self.number} ({self.first_line[:60]!r})"


def _lines(cell: Cell) -> int:
    return cell.source.count("\n") + 1


def cells_name(numbers: tuple[int, ...], source: str) -> str:
    """`cell 4 ('# GET /x')`, or `cells 3+5 ('# GET /x')` for an endpoint in two cells."""
    return f"cell{'s' if len(numbers) > 1 else ''} {cell_label(numbers, source)}" \
        if numbers else ""


def cell_label(numbers: tuple[int, ...], source: str) -> str:
    """How a traceback names the cell(s) a piece of code came from: `4 ('# GET /x')`, or
    `3+5 ('# GET /x')` for an endpoint written in two cells."""
    first = source.strip().splitlines()[0] if source.strip() else ""
    return f"{'+'.join(map(str, numbers))} ({first[:60]!r})"


@dataclass(frozen=True)
class Batching:
    """`# kgpool: batch max_size=32 max_wait=0.01`: concurrent requests run together."""

    max_size: int = 10  # Ray Serve's defaults
    max_wait: float = 0.01  # seconds the first request of a batch waits for more


@dataclass(frozen=True)
class Endpoint:
    """One method on one path: the joined cells to run and the optional ResponseInfo code."""

    method: str
    path: str
    source: str
    cells: tuple[int, ...]  # cell numbers, counted from 1
    response_source: str | None = None
    response_cells: tuple[int, ...] = ()
    batch: Batching | None = None
    stream: str | None = None  # `# kgpool: stream` (chunked) or `stream sse`
    cell_lines: tuple[int, ...] = ()  # lines of each joined cell, to find a line's cell
    response_lines: tuple[int, ...] = ()

    def locate(self, line: int, response: bool = False) -> str:
        """`cell 4 ('# GET /x'), line 2`: where line `line` of the joined code is."""
        numbers = self.response_cells if response else self.cells
        counts = self.response_lines if response else self.cell_lines
        source = (self.response_source or "") if response else self.source
        pieces = source.split("\n")
        start = 0
        for number, count in zip(numbers, counts, strict=False):
            if line <= start + count:
                first = pieces[start] if start < len(pieces) else ""
                return f"{cells_name((number,), first)}, line {line - start}"
            start += count
        return f"{cells_name(numbers, source)}, line {line}"

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(name for _, name in split_path(self.path) if name)

    @functools.cached_property
    def names(self) -> tuple[str, str]:
        """How messages name its cells and its ResponseInfo cells: `cell 4 ('# GET /x')`."""
        return (cells_name(self.cells, self.source),
                cells_name(self.response_cells, self.response_source or ""))


@dataclass(frozen=True)
class Notebook:
    name: str
    language: str
    kernel_name: str
    init_cells: tuple[Cell, ...]
    endpoints: tuple[Endpoint, ...]  # notebook order
    warnings: tuple[str, ...] = ()  # doubts about cells; errors under --strict
    raw: bytes = field(default=b"", repr=False, compare=False)  # the file, as read


def load_notebook(path: Path | str, *, strict: bool = False,
                  prefixes: Mapping[str, str] | None = None) -> Notebook:
    """Read and parse an .ipynb file; NotebookError says why it cannot be served."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise NotebookError(f"cannot read notebook {path}: {exc}") from exc
    notebook = parse_notebook(text, name=path.stem, strict=strict, prefixes=prefixes)
    return dataclasses.replace(notebook, raw=raw)


def parse_notebook(text: str, name: str = "notebook", *, strict: bool = False,
                   prefixes: Mapping[str, str] | None = None) -> Notebook:
    """Endpoints and init cells by Kernel Gateway's grammar. Cells it would treat as init cells
    although they look like annotations are init cells here too, with a warning (an error with
    `strict`). `prefixes` adds comment prefixes by language, as Kernel Gateway's comment_prefix."""
    try:
        nb = nbformat.reads(text, as_version=4)
    except Exception as exc:  # nbformat raises several unrelated types for bad input
        raise NotebookError(f"{name} is not a readable notebook: {exc}") from exc
    metadata = nb.get("metadata", {})
    language = str((metadata.get("language_info") or {}).get("name")
                   or (metadata.get("kernelspec") or {}).get("language") or "python").lower()
    kernel_name = str((metadata.get("kernelspec") or {}).get("name") or "")
    comments = comment_prefixes(language, prefixes or {})
    code_cells = [Cell(i, _source(c)) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    grammar = _Grammar(comments, strict)
    return grammar.build(name, language, kernel_name, code_cells)


def _source(cell: Mapping[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


class _Grammar:
    """Kernel Gateway's annotation regex (`PREFIX\\s+VERB\\s+/path`, matched at the cell's first
    character), plus kgpool's PATCH, and a looser pattern that finds the near misses."""

    def __init__(self, prefixes: tuple[str, ...], strict: bool) -> None:
        alt = "|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True))
        self.prefix = prefixes[0]
        self.endpoint = re.compile(
            rf"(?:{alt})\s+(ResponseInfo\s+)?({'|'.join(METHODS)})\s+(/.*)")
        self.near = re.compile(rf"(?:{alt})\s*(?:ResponseInfo\s*)?(?:{'|'.join(_VERBS)})\s*/",
                               re.IGNORECASE)
        self.option = re.compile(rf"^[ \t]*(?:{alt})[ \t]*kgpool:[ \t]*(.*?)[ \t]*$",
                                 re.MULTILINE)
        self.strict = strict
        self.warnings: list[str] = []

    def doubt(self, message: str) -> None:
        """A cell Kernel Gateway serves but that is probably not what its author meant."""
        if self.strict:
            raise NotebookError(message + " (refused: --strict)")
        self.warnings.append(message)

    def build(self, name: str, language: str, kernel_name: str, cells: list[Cell]) -> Notebook:
        init: list[Cell] = []
        bodies: dict[tuple[str, str], list[Cell]] = {}
        infos: dict[tuple[str, str], list[Cell]] = {}
        for cell in cells:
            match = self.endpoint.match(cell.source)
            if match is None:
                if self.near.match(cell.source.lstrip()):
                    self.doubt(
                        f"{cell.name} looks like an endpoint annotation but is not one, so it "
                        f"runs as an init cell at warm-up (as in Kernel Gateway); for an "
                        f"endpoint write '{self.prefix} METHOD /path' on the first line, METHOD "
                        f"one of {', '.join(METHODS)} in capitals")
                init.append(cell)
                continue
            is_info, method, path = bool(match.group(1)), match.group(2), match.group(3).strip()
            self.check_path(path, cell)
            (infos if is_info else bodies).setdefault((method, path), []).append(cell)
        for (method, path), group in infos.items():
            if (method, path) not in bodies:
                self.doubt(f"ResponseInfo {', '.join(c.name for c in group)} for {method} "
                           f"{path}: no endpoint has that method and path, so it never runs")
        if not bodies:
            raise NotebookError(
                f"{name} has no endpoint: no code cell starts with '{self.prefix} METHOD /path' "
                f"(METHOD one of {', '.join(METHODS)})" + "".join(
                    f"; {warning}" for warning in self.warnings))
        for group in infos.values():
            for cell in group:
                if self.option.search(cell.source):
                    raise NotebookError(f"{cell.name}: 'kgpool:' options go in the endpoint's "
                                        "cell, not its ResponseInfo cell")
        endpoints = tuple(
            Endpoint(method=m, path=p, source="\n".join(c.source for c in group),
                     cells=tuple(c.number for c in group),
                     response_source=("\n".join(c.source for c in infos[m, p])
                                      if (m, p) in infos else None),
                     response_cells=tuple(c.number for c in infos.get((m, p), ())),
                     cell_lines=tuple(_lines(c) for c in group),
                     response_lines=tuple(_lines(c) for c in infos.get((m, p), ())),
                     **self.options(group))
            for (m, p), group in bodies.items())
        self.check_shapes(endpoints)
        return Notebook(name, language, kernel_name, tuple(init), endpoints,
                        tuple(self.warnings))

    def options(self, cells: list[Cell]) -> dict[str, Any]:
        """`kgpool:` comment lines of an endpoint's cells: batching or streaming. Kernel
        Gateway reads them as comments, so the notebook runs there unbatched, unstreamed."""
        found: dict[str, Any] = {}
        for cell in cells:
            for line in self.option.finditer(cell.source):
                words = line.group(1).split()
                kind, rest = (words[0].lower(), words[1:]) if words else ("", [])
                if kind == "batch":
                    found["batch"] = _batching(rest, cell)
                elif kind == "stream":
                    found["stream"] = _streaming(rest, cell)
                else:
                    raise NotebookError(
                        f"{cell.name}: unknown option 'kgpool: {line.group(1)}'; write "
                        "'kgpool: batch [max_size=N] [max_wait=SECONDS]' or "
                        "'kgpool: stream [chunked|sse]'")
        if "batch" in found and "stream" in found:
            raise NotebookError(f"{cells[0].name}: an endpoint is batched or streamed, not both")
        return found

    def check_path(self, path: str, cell: Cell) -> None:
        if any(ch.isspace() for ch in path):
            self.doubt(f"{cell.name}: the path {path!r} contains whitespace; Kernel Gateway "
                       "registers it but no request can reach it; kgpool matches it literally "
                       "(a client sends the spaces as %20)")
        for _, param in split_path(path):
            if param is not None and not param.isidentifier():
                raise NotebookError(
                    f"{cell.name}: ':{param}' is not a valid parameter name (letters, digits "
                    "and _, not starting with a digit; one per path segment)")

    def check_shapes(self, endpoints: tuple[Endpoint, ...]) -> None:
        """Two spellings of one route shape (`/u/:id`, `/u/:name`): the first in the notebook
        takes every such URL, so the other's methods answer 405, as in Kernel Gateway."""
        seen: dict[tuple[Any, ...], str] = {}
        for ep in endpoints:
            shape = tuple((lit, param is not None) for lit, param in split_path(ep.path))
            other = seen.setdefault(shape, ep.path)
            if other != ep.path:
                self.doubt(f"paths {other} and {ep.path} match the same URLs: every request "
                           f"goes to {other} (the first in the notebook, as in Kernel Gateway), "
                           f"so the cells of {ep.method} {ep.path} never run; use one spelling")


def _batching(words: list[str], cell: Cell) -> Batching:
    values: dict[str, Any] = {}
    for word in words:
        key, eq, text = word.partition("=")
        try:
            if key == "max_size" and eq:
                values[key] = int(text)
                if not 1 <= values[key] <= 10_000:
                    raise ValueError
            elif key == "max_wait" and eq:
                values[key] = _seconds(text)
            else:
                raise KeyError(word)
        except (ValueError, KeyError):
            raise NotebookError(
                f"{cell.name}: 'kgpool: batch' takes max_size=N (1..10000) and "
                f"max_wait=SECONDS (e.g. 0.01 or 10ms), not {word!r}") from None
    return Batching(**values)


def _seconds(text: str) -> float:
    value = float(text[:-2]) / 1000 if text.endswith("ms") else float(text.removesuffix("s"))
    if not 0 <= value <= 60:
        raise ValueError(text)
    return value


def _streaming(words: list[str], cell: Cell) -> str:
    mode = words[0].lower() if words else "chunked"
    if len(words) > 1 or mode not in ("chunked", "sse"):
        raise NotebookError(f"{cell.name}: 'kgpool: stream' takes chunked (the default) or "
                            f"sse, not {' '.join(words)!r}")
    return mode


def split_path(path: str) -> list[tuple[str, str | None]]:
    """'/a/b:id' -> [('', None), ('a', None), ('b', 'id')]: per segment a literal prefix and
    maybe a parameter."""
    parts: list[tuple[str, str | None]] = []
    for segment in path.split("/"):
        literal, colon, param = segment.partition(":")
        if colon and not any(ch.isspace() for ch in segment):
            parts.append((literal, param))
        else:  # a segment with whitespace is matched literally (Kernel Gateway: unreachable)
            parts.append((segment, None))
    return parts
