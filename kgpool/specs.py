"""API documents of the served notebooks: Kernel Gateway's Swagger 2.0 and an OpenAPI 3."""

from __future__ import annotations

import re
from typing import Any

from .notebook import Notebook, split_path


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


def openapi(served: list[tuple[str, Notebook]], base: str = "") -> dict[str, Any]:
    """An OpenAPI 3 document for the notebooks' endpoints and kgpool's operational paths."""
    error = {"content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    paths: dict[str, dict[str, Any]] = {}
    for prefix, ep in [(prefix, ep) for prefix, nb in served for ep in nb.endpoints]:
        template = prefix + "/".join(lit + ("{" + param + "}" if param else "")
                                     for lit, param in split_path(ep.path))
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
            "servers": [{"url": base or "/"}], "paths": paths}
