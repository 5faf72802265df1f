"""Per kernel language: comment syntax of annotations and the inert binding of REQUEST."""

from __future__ import annotations

import json
from collections.abc import Mapping

# Comment prefix by language_info.name; anything unlisted uses "#", as Kernel Gateway does.
COMMENT_PREFIXES = {
    "scala": "//", "javascript": "//", "typescript": "//", "java": "//", "kotlin": "//",
    "groovy": "//", "go": "//", "rust": "//", "c": "//", "c++": "//", "csharp": "//",
    "c#": "//", "f#": "//", "swift": "//",
    "sql": "--", "haskell": "--", "lua": "--",
    "matlab": "%", "octave": "%", "prolog": "%", "erlang": "%",
}


def comment_prefixes(language: str, configured: Mapping[str, str]) -> tuple[str, ...]:
    """Comment syntaxes an annotation may start with: the one configured for the language
    (Kernel Gateway's comment_prefix), then the language's own."""
    own = COMMENT_PREFIXES.get(language, "#")
    return tuple(dict.fromkeys(p for p in (configured.get(language), own) if p))


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


def bind_request_from_file(language: str, path: str) -> str | None:
    """Code that sets REQUEST to the text of a file, for requests too large to send as code
    (ipykernel hashes every cell's code in pure Python: ~0.3 s per MB); None if the language
    has no such binding yet."""
    if language == "python":
        return (f"REQUEST = open({path!r}, encoding='utf-8', errors='surrogateescape')"
                ".read()\n")
    return None
