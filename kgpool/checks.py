"""What `kgpool serve` checks before it starts a kernel, shared with `kgpool routes`: which kernel
spec serves the notebook (the notebook's, or another of the same language when the notebook was
saved where a different one was installed), whether kgpool may serve its language, and, for
Python, the syntax of every cell (an init cell that cannot compile would fail every kernel; an
endpoint that cannot compile answers 500 until it is fixed, which deserves a warning up front).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager

from .config import Settings
from .errors import ConfigError, NotebookError
from .languages import Language, kernel_language
from .notebook import Notebook

# The spec chosen when a notebook's own is missing, by language: the usual names
_USUAL = {"python": "python3", "r": "ir", "bash": "bash", "octave": "octave",
          "javascript": "javascript"}
_FLAGS = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT


@dataclass(frozen=True)
class Plan:
    """A notebook as kgpool will serve it: every warning about it, the kernel spec, the
    language."""

    notebook: Notebook  # its warnings include the checks' own
    kernel_name: str
    language: Language


def plan(notebook: Notebook, settings: Settings) -> Plan:
    """ConfigError / NotebookError for whatever `serve` refuses; warnings for the rest."""
    kernel_name, language_name, warnings = choose_kernel(notebook, settings.kernel_name)
    language = kernel_language(language_name, kernel_name, settings.allow_unverified_language)
    batched = [ep for ep in notebook.endpoints if ep.batch is not None]
    if batched and language.name != "python":
        raise ConfigError(f"{notebook.name}: {batched[0].method} {batched[0].path} is "
                          f"batched ('kgpool: batch'), which needs a Python kernel, and "
                          f"{kernel_name!r} runs {language_name}")
    if not language.verified:
        warnings.append(f"kernel {kernel_name!r} runs {language_name or 'an unnamed language'},"
                        " whose REQUEST binding no kgpool test has proven inert; request bytes "
                        "might run as code")
    if language.name == "python":
        program = kernel_program(kernel_name)
        warnings += python_checks(notebook, settings.strict,
                                  other=None if _is_this_python(program) else program)
    if warnings:
        notebook = dataclasses.replace(notebook, warnings=notebook.warnings + tuple(warnings))
    return Plan(notebook, kernel_name, language)


def choose_kernel(notebook: Notebook, pinned: str = "") -> tuple[str, str, list[str]]:
    """(kernel spec name, its language, warnings). A spec given with --kernel-name must be
    installed; the notebook's own may be replaced by an installed one of the same language."""
    specs = installed_specs()
    names = ", ".join(sorted(specs)) or "none"
    if pinned:
        if pinned not in specs:
            raise ConfigError(f"{notebook.name}: no kernel spec named {pinned!r} is installed "
                              f"(installed: {names})")
        return pinned, _language(specs[pinned]), []
    wanted = notebook.kernel_name or "python3"
    if wanted in specs:
        return wanted, _language(specs[wanted]), []
    language = notebook.language
    same = sorted(name for name, spec in specs.items() if _language(spec) == language)
    if not same:
        raise ConfigError(
            f"{notebook.name}: no kernel spec named {wanted!r} is installed, nor any other "
            f"for {language} (installed: {names}); install one, or choose one with "
            "--kernel-name")
    usual = _USUAL.get(language, "")
    chosen = usual if usual in same else same[0]
    program = kernel_program(chosen, specs)
    return chosen, language, [(
        f"the notebook's kernel spec {wanted!r} is not installed here: serving it with "
        f"{chosen!r} (the {language} kernel that runs {program}; cells import the packages "
        f"installed for it). Pin a kernel with --kernel-name NAME (for {language}: "
        f"{', '.join(same)})")]


def installed_specs() -> dict[str, dict[str, Any]]:
    """{name: its kernel.json} of every kernel spec jupyter_client finds (read as JSON: making
    KernelSpec objects of them all would warn about every unknown field)."""
    found = {}
    for name, folder in KernelSpecManager().find_kernel_specs().items():
        try:
            with open(os.path.join(folder, "kernel.json"), encoding="utf-8") as file:
                spec = json.load(file)
        except (OSError, ValueError):
            continue
        if isinstance(spec, dict):
            found[name] = spec
    if "python3" not in found:  # ipykernel's own, which jupyter_client offers without a file
        found["python3"] = {"argv": [sys.executable], "language": "python"}
    return found


def kernel_program(name: str, specs: dict[str, dict[str, Any]] | None = None) -> str:
    """The program a kernel spec starts: `python` means kgpool's own Python, as jupyter_client
    starts it."""
    spec = (specs if specs is not None else installed_specs()).get(name) or {}
    program = str((spec.get("argv") or ["?"])[0])
    if program in ("python", "python3", f"python3.{sys.version_info[1]}"):
        return sys.executable
    return program


def _is_this_python(program: str) -> bool:
    try:
        return os.path.samefile(program, sys.executable)
    except OSError:
        return program == sys.executable


def _language(spec: dict[str, Any]) -> str:
    return str(spec.get("language") or "").strip().lower()


def python_checks(notebook: Notebook, strict: bool, other: str | None = None) -> list[str]:
    """NotebookError for an init cell that cannot compile (every kernel would fail on it);
    a warning (an error with --strict) for an endpoint or ResponseInfo cell that cannot.
    `other`: the kernel runs that Python, not kgpool's, whose syntax may differ: warnings
    only."""
    warnings = []
    for cell in notebook.init_cells:
        found = python_syntax_error(cell.source)
        if found is not None and other is None:
            raise NotebookError(f"init {cell.name}, line {found[0]}: SyntaxError: {found[1]} "
                                "(every kernel runs it before serving: fix the cell)")
        if found is not None:
            warnings.append(f"init {cell.name}, line {found[0]}: kgpool's Python "
                            f"{sys.version_info[0]}.{sys.version_info[1]} cannot compile it "
                            f"(SyntaxError: {found[1]}); the kernel's ({other}) may")
    for ep in notebook.endpoints:
        for response, source in ((False, ep.source), (True, ep.response_source)):
            found = python_syntax_error(source) if source else None
            if found is None:
                continue
            message = (f"{ep.locate(found[0], response)}: SyntaxError: {found[1]}; every "
                       f"request to {ep.method} {ep.path} will be answered 500 until the "
                       "cell is fixed")
            if other is not None:
                message += f" (checked with kgpool's Python; the kernel runs {other})"
            elif strict:
                raise NotebookError(message + " (refused: --strict)")
            warnings.append(message)
    return warnings


def python_syntax_error(source: str) -> tuple[int, str] | None:
    """(line, message) if IPython could not compile the cell, else None. Plain Python is
    tried first; only a cell that fails is run through IPython's own input transformations
    (magics, !shell lines), so that kgpool reports exactly what the kernel would."""
    if source.lstrip().startswith("%%"):  # a cell magic: its body need not be Python
        return None
    try:
        compile(source, "<cell>", "exec", _FLAGS)
        return None
    except SyntaxError:
        pass
    except (ValueError, RecursionError):  # null bytes, or nested past the parser
        return None
    try:
        from IPython.core.inputtransformer2 import TransformerManager
        transformed = TransformerManager().transform_cell(source)
    except Exception:  # no IPython here, or it cannot transform the cell either
        transformed = source
    try:
        compile(transformed, "<cell>", "exec", _FLAGS)
        return None
    except SyntaxError as exc:
        return (exc.lineno or 1), str(exc.msg)
    except (ValueError, RecursionError):
        return None

