"""Per kernel language, one table: annotation comment syntaxes, the inert binding of REQUEST,
how cells are sent, whether a real-kernel test proved it, and the transport its kernels need.

Adding a language is one `Language` entry here plus a real-kernel test in
tests/test_languages.py; only then may it be marked verified.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")


def printable_json(request: str) -> str:
    """The REQUEST text with anything outside printable ASCII written as a JSON \\u escape.

    request_document() already writes only printable ASCII (json.dumps escapes the rest);
    this keeps it so, because several kernels are fed code through a terminal, where a
    control character (DEL erases, ^U kills the line) would edit the code."""
    return _NOT_PRINTABLE.sub(lambda m: "".join(
        f"\\u{unit:04x}" for unit in _utf16(m.group())), request)


def _utf16(ch: str) -> list[int]:
    data = ch.encode("utf-16-be", errors="surrogatepass")
    return [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]


def _same(code: str) -> str:
    return code


def _generic_bind(request: str) -> str:
    """Kernel Gateway's own binding. A JSON string literal is valid and inert in many
    languages (Python, JavaScript, R, C-like), but not where "..." interpolates."""
    return f"REQUEST = {json.dumps(request)}\n"


@dataclass(frozen=True)
class Language:
    """What kgpool knows of one kernel language (the `language` of a kernel.json)."""

    name: str
    comments: tuple[str, ...] = ("#",)  # line comments an annotation may start with
    bind: Callable[[str], str] = _generic_bind  # REQUEST text -> code that sets it, inert
    verified: bool = False  # tests/test_languages.py proves bind on a real kernel
    transport: str = "tcp"  # "ipc" where the kernels are known to support IPC sockets
    scope: Callable[[str], str] = _same  # how an endpoint or ResponseInfo cell is run
    # kernels that report errors only as text: (code, marker) -> code that ends by printing
    # the marker and a JSON report, {} or {"ename", "evalue"}; read_report() undoes it
    guard: Callable[[str, str], str] | None = None
    setup: str = ""  # run (silently) in every kernel before the init cells
    unnamed_error: str = "Error"  # ename when the kernel sends none
    tidy_error: Callable[[str], str] = _same  # the kernel's evalue -> the message

    def request_code(self, code: str, request: str, marker: str) -> str:
        """One execution: bind REQUEST, then run the endpoint's cells. A one-line binding goes
        in front of the cell's first line (its annotation, a comment), so that the kernel's
        line numbers are the notebook's."""
        binding = self.bind(printable_json(request))
        cell = self.guarded(self.scope(code), marker)
        if self.guard is None and binding.endswith("\n") and binding.count("\n") == 1:
            return binding[:-1] + " " + cell
        return binding + cell

    def response_code(self, code: str, marker: str) -> str:
        return self.guarded(self.scope(code), marker)

    def guarded(self, code: str, marker: str) -> str:
        return self.guard(code, marker) if self.guard is not None else code

    def error(self, ename: str, evalue: str) -> tuple[str, str]:
        """(name, message) of a cell's failure as a client should read them."""
        return (ename or self.unnamed_error), self.tidy_error(evalue)


def read_report(text: str, marker: str) -> tuple[str, dict[str, Any] | None] | None:
    """Split a guarded cell's output into what the cell printed and its error (or None).
    None if the report is missing: the kernel did not run the guard to its end (octave_kernel
    whose Octave exited or was killed stays up, answering nothing, ever again)."""
    at = text.rfind(marker)
    if not marker or at < 0:
        return None
    report = text[at + len(marker):].strip()
    try:
        fields = json.loads(report)
        if not fields:
            return text[:at], None
        ename, evalue = str(fields.get("ename", "")), str(fields.get("evalue", ""))
    except (ValueError, AttributeError):
        ename, evalue = "", report
    return text[:at], {"ename": ename, "evalue": evalue, "traceback": [evalue]}


# ----- bindings -------------------------------------------------------------------------------

def _python_bind(request: str) -> str:
    return f"REQUEST = {request!r}\n"  # repr(str) is always a one-line, exact literal


def _bash_bind(request: str) -> str:
    # single quotes: no expansion at all ($(...), `...`, ${...}, !! history); ' is '\''
    return "REQUEST='" + request.replace("'", "'\\''") + "'\n"


def _r_bind(request: str) -> str:
    return f"REQUEST <- {json.dumps(request)}\n"  # R strings do not interpolate


def _javascript_bind(request: str) -> str:
    # `var` has no completion value, so a cell that ends in a declaration still answers
    # nothing (a bare assignment would make REQUEST the cell's execute_result)
    return f"var REQUEST = {json.dumps(request)};\n"


# Kernel Gateway's comment syntax is `#` for JavaScript unless configured, and node cannot
# parse `# GET /x`: such annotation lines (never valid JavaScript) are sent as // comments.
_HASH_ANNOTATION = re.compile(
    r"^#(?=[ \t]+(?:ResponseInfo[ \t]+)?(?:GET|POST|PUT|DELETE|PATCH)[ \t]+/\S*[ \t]*$)",
    re.MULTILINE)


def _javascript_scope(code: str) -> str:
    # A block: `let`, `const` and `class` at the top of an endpoint cell are declared anew
    # on every request instead of failing from the second one on ("already been declared").
    # `var`, assignments and (sloppy-mode) functions still reach the global scope.
    return "{ " + _HASH_ANNOTATION.sub("//", code) + "\n}"  # `{ ` keeps the line numbers


def _ruby_bind(request: str) -> str:
    # '...' only knows \\ and \'; "..." would interpolate #{...}
    return "REQUEST = '" + request.replace("\\", "\\\\").replace("'", "\\'") + "'\n"


def _dollar_escaped_bind(request: str) -> str:
    # Julia and Kotlin interpolate $name, $(...) and ${...} in "...": \$ is a plain dollar
    return "REQUEST = " + json.dumps(request).replace("$", "\\$") + "\n"


def _perl_bind(request: str) -> str:
    return "my $REQUEST = '" + request.replace("\\", "\\\\").replace("'", "\\'") + "';\n"


# ----- Octave (and MATLAB syntax) ---------------------------------------------------------

# octave_kernel types code into a terminal in canonical mode, which cuts lines at 4095
# bytes: long strings are built from pieces, a few on each physical line.
_OCTAVE_PIECE = 1400
_OCTAVE_LINE = 3000


def octave_string(text: str) -> str:
    """An Octave/MATLAB expression equal to text: single-quoted pieces (no escapes are
    processed in '...'; a quote is doubled) and char(n) for control characters."""
    tokens: list[str] = []
    piece: list[str] = []
    size = 0
    for ch in text:
        if ch < " " or ch == "\x7f":
            if piece:
                tokens.append("'" + "".join(piece) + "'")
                piece, size = [], 0
            tokens.append(f"char({ord(ch)})")
            continue
        piece.append("''" if ch == "'" else ch)
        size += len(ch.encode("utf-8", errors="surrogatepass")) + (ch == "'")
        if size >= _OCTAVE_PIECE:
            tokens.append("'" + "".join(piece) + "'")
            piece, size = [], 0
    if piece or not tokens:
        tokens.append("'" + "".join(piece) + "'")
    lines: list[list[str]] = [[]]
    used = 0
    for token in tokens:
        cost = len(token.encode("utf-8", errors="surrogatepass")) + 1
        if lines[-1] and used + cost > _OCTAVE_LINE:
            lines.append([])
            used = 0
        lines[-1].append(token)
        used += cost
    return "[" + " ...\n".join(" ".join(line) for line in lines) + "]"


def _octave_bind(request: str) -> str:
    return f"REQUEST = {octave_string(request)};\n"  # the ; keeps Octave from echoing it


def _octave_guard(code: str, marker: str) -> str:
    # octave_kernel reports an error as printed text, with status ok, and goes on with the
    # next line. The cell runs as one eval (parse errors included), then prints the marker,
    # which no request can forge (the service chose it at random), and the outcome. Nothing
    # it needs survives in variables, so a `clear all` in the cell changes nothing.
    return (f"kgpool__cell = {octave_string(code)};\n"
            f"try, eval(kgpool__cell); fprintf('%s{{}}\\n', '{marker}'); catch kgpool__err, "
            f"fprintf('%s%s\\n', '{marker}', jsonencode(struct("
            "'ename', kgpool__err.identifier, 'evalue', kgpool__err.message))); end\n"
            "clear kgpool__cell kgpool__err\n")


# octave_kernel's Octave dumps its workspace into the notebook's folder when killed by a
# signal, which is how kgpool retires a kernel that ran past its deadline.
_OCTAVE_SETUP = ("crash_dumps_octave_core(false); sighup_dumps_octave_core(false); "
                 "sigterm_dumps_octave_core(false);")


_R_EVAL_CALL = re.compile(r"\AError in eval\(expr, envir, enclos\): ")


def _exit_status(evalue: str) -> str:
    value = evalue.strip()
    return f"the cell's last command exited with status {value}" if value.isdigit() else value


_C_LIKE = ("//",)
_ENTRIES = (
    # verified: tests/test_languages.py runs each on a real kernel
    Language("python", bind=_python_bind, verified=True, transport="ipc"),
    Language("bash", bind=_bash_bind, verified=True, transport="ipc",
             unnamed_error="ExitStatus", tidy_error=_exit_status),
    Language("r", bind=_r_bind, verified=True, transport="ipc",
             tidy_error=lambda v: _R_EVAL_CALL.sub("", v.rstrip())),
    Language("octave", comments=("#", "%"), bind=_octave_bind, verified=True,
             transport="ipc", guard=_octave_guard, setup=_OCTAVE_SETUP, unnamed_error="error"),
    # ijavascript and tslab bind TCP sockets only (tslab names IPC sockets its own way)
    Language("javascript", comments=("//", "#"), bind=_javascript_bind, verified=True,
             scope=_javascript_scope),
    # not verified: no kernel of these is installed by the test suite
    Language("matlab", comments=("%",), bind=_octave_bind, guard=_octave_guard,
             unnamed_error="error"),
    Language("typescript", comments=_C_LIKE, bind=_javascript_bind),
    Language("ruby", bind=_ruby_bind),
    Language("julia", bind=_dollar_escaped_bind),
    Language("kotlin", comments=_C_LIKE, bind=_dollar_escaped_bind),
    Language("groovy", comments=_C_LIKE, bind=_ruby_bind),  # '...' does not interpolate
    Language("perl", bind=_perl_bind),
    *(Language(name, comments=_C_LIKE) for name in (
        "scala", "java", "go", "rust", "c", "c++", "csharp", "c#", "f#", "swift")),
    *(Language(name, comments=("--",)) for name in ("sql", "haskell", "lua")),
    *(Language(name, comments=("%",)) for name in ("prolog", "erlang")),
)
LANGUAGES: dict[str, Language] = {entry.name: entry for entry in _ENTRIES}


def language(name: str) -> Language:
    """The entry for a language name (case-insensitive); unknown ones get Kernel Gateway's
    defaults: `#` comments and `REQUEST = "<JSON>"`, unverified."""
    key = name.strip().lower()
    return LANGUAGES.get(key) or Language(key or "unknown")


def comment_prefixes(name: str, configured: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The comment syntaxes an annotation may use in a notebook of this language: one
    configured for it (Kernel Gateway's comment_prefix; `*` for every language) first, then
    the language's own."""
    configured = configured or {}
    first = configured.get(name.strip().lower()) or configured.get("*")
    return tuple(dict.fromkeys(p for p in (first, *language(name).comments) if p))


def bind_request(name: str, request: str) -> str:
    """Code that sets the REQUEST global to the given text, as data the text cannot escape."""
    return language(name).bind(printable_json(request))


def kernel_language(name: str, kernel_name: str, allow_unverified: bool) -> Language:
    """The language a kernel spec declares, if kgpool may serve it; ConfigError otherwise."""
    entry = language(name)
    if not entry.verified and not allow_unverified:
        verified = ", ".join(e.name for e in _ENTRIES if e.verified)
        raise ConfigError(
            f"kernel {kernel_name!r} runs {name or 'an unnamed language'}, for which kgpool "
            f"has no REQUEST binding proven inert on a real kernel (verified: {verified}); "
            "--allow-unverified-language serves it anyway")
    return entry


def bind_request_from_file(name: str, path: str) -> str | None:
    """Code that sets REQUEST to the text of a file, for requests too large to send as code
    (ipykernel hashes every cell's code in pure Python: ~0.3 s per MB); None if the language
    has no such binding yet."""
    if language(name).name == "python":
        return (f"REQUEST = open({path!r}, encoding='utf-8', errors='surrogateescape')"
                ".read()\n")
    return None


def transport_for(entry: Language, setting: str) -> str:
    """'ipc' or 'tcp': the setting when forced, else what the language's kernels need."""
    return entry.transport if setting == "auto" else setting
