"""Notebook -> init cells and endpoints: the annotation grammar. Pure: text in, data out."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

from .errors import NotebookError
from .languages import comment_prefixes

METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")

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
        return tuple(name for _, name in split_path(self.path) if name)


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
    # the notebook's language chooses only the comment syntax; the kernel started (and so the
    # REQUEST binding) is the service's business
    prefixes = comment_prefixes(language)
    code_cells = [Cell(i, _source(c)) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    return _build(name, language, kernel_name, prefixes, code_cells)


def _source(cell: Mapping[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def _annotation_patterns(prefixes: tuple[str, ...]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    p = "(?:" + "|".join(map(re.escape, prefixes)) + ")"
    strict = re.compile(rf"{p}[ \t]+(ResponseInfo[ \t]+)?({'|'.join(METHODS)})[ \t]+(/.*)")
    loose = re.compile(rf"{p}[ \t]*(ResponseInfo[ \t]*)?[A-Za-z]+[ \t]+/", re.IGNORECASE)
    return strict, loose


def _build(name: str, language: str, kernel_name: str, prefixes: tuple[str, ...],
           cells: list[Cell]) -> Notebook:
    strict, loose = _annotation_patterns(prefixes)
    prefix = prefixes[0]
    init: list[Cell] = []
    bodies: dict[tuple[str, str], list[Cell]] = {}
    infos: dict[tuple[str, str], list[Cell]] = {}
    spaced: list[str] = []
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
        warning = _check_path(path, cell)
        if warning:
            spaced.append(warning)
        (infos if is_info else bodies).setdefault((method, path), []).append(cell)
    warnings = spaced + [
        f"ResponseInfo cell(s) {[c.index for c in group]} for {m} {p} have no endpoint"
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


def _check_path(path: str, cell: Cell) -> str | None:
    """NotebookError for a path kgpool cannot route; a warning for one no client can reach."""
    for _, param in split_path(path):
        if param is not None and not _PARAM_NAME.match(param):
            raise NotebookError(
                f"cell {cell.index} ({cell.first_line!r}): ':{param}' is not a valid parameter "
                "name (letters, digits and _, not starting with a digit; one per path segment)")
    if any(ch.isspace() for ch in path):  # Kernel Gateway starts with it too (no newline
        # after the annotation, as in its own test notebook): warn, do not refuse
        return (f"cell {cell.index} ({cell.first_line!r}): the path {path!r} contains spaces; "
                "is the rest of the line code meant for the next line?")
    return None


def _check_shapes(endpoints: tuple[Endpoint, ...]) -> None:
    """Two spellings of one route shape (`/u/:id` and `/u/:name`) would make 405s ambiguous."""
    seen: dict[tuple[Any, ...], str] = {}
    for ep in endpoints:
        shape = tuple((lit, param is not None) for lit, param in split_path(ep.path))
        other = seen.setdefault(shape, ep.path)
        if other != ep.path:
            raise NotebookError(f"paths {other} and {ep.path} match the same URLs; use one "
                                "spelling")


def split_path(path: str) -> list[tuple[str, str | None]]:
    """'/a/b:id' -> [('', None), ('a', None), ('b', 'id')]: per segment a literal prefix and
    maybe a parameter."""
    parts: list[tuple[str, str | None]] = []
    for segment in path.split("/"):
        literal, colon, param = segment.partition(":")
        parts.append((literal, param if colon else None))
    return parts
