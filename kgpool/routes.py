"""Routing: path templates with `:param` segments, matched literally against decoded segments."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote

from .notebook import Endpoint, split_path


@dataclass
class Route:
    """All endpoints that share one path template; matching works on decoded segments."""

    path: str
    endpoints: dict[str, Endpoint] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._segments = split_path(self.path)

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

    def has_fixed(self, raw_path: str) -> bool:
        """A route without parameters is exactly this path."""
        return raw_path in self._fixed

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
