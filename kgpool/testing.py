"""Testing a notebook's API from pytest: the notebook served by real kernels inside the test's
own event loop, and a client for it.

    import kgpool.testing

    async def test_convert():
        async with kgpool.testing.serve("convert.ipynb") as client:
            resp = await client.get("/convert", params={"angle": "180"})
        assert resp.status == 200
        assert resp.json() == {"convertedAngle": 3.141592653589793}

`serve` runs the same aiohttp application as `kgpool serve`, on a free 127.0.0.1 port, and
returns once every kernel is warm; a notebook kgpool cannot serve, or an init cell that fails,
raises right there (NotebookError, ConfigError, InitError), and kgpool's log lines reach the
test's log capture. Leaving the block, however it is left (an exception, a failed assertion, a
cancellation, a timeout), shuts every kernel down. Async tests need an async plugin:
pytest-asyncio (`asyncio_mode = "auto"`, or `@pytest.mark.asyncio`) or pytest-aiohttp.
"""

from __future__ import annotations

import contextlib
import json as jsonlib
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from .call import quote_target
from .config import Settings
from .local import LocalServer

__all__ = ["Client", "Response", "serve"]

Query = Mapping[str, Any] | Sequence[tuple[str, Any]] | str | None
# pytest tells ipykernel it runs under pytest through this variable, and ipykernel then stops
# capturing file-descriptor output: the kernels must run as they do in production.
_NOT_FOR_KERNELS = ("PYTEST_CURRENT_TEST",)


@dataclass(frozen=True)
class Response:
    """An answer, read whole: `status`, `reason`, `headers` (case-insensitive), the body as
    `content` (bytes), `text` (decoded with its charset, else UTF-8) and `json()`."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    content: bytes

    @property
    def content_type(self) -> str:
        """The media type without its parameters: "application/json"."""
        return self.headers.get("Content-Type", "").split(";")[0].strip().lower()

    @property
    def text(self) -> str:
        charset = "utf-8"
        for param in self.headers.get("Content-Type", "").split(";")[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset" and value.strip():
                charset = value.strip().strip('"')
        return self.content.decode(charset)

    def json(self) -> Any:
        return jsonlib.loads(self.content)


class Client:
    """Calls the served notebook. Paths are relative to the server's base URL (--base-url);
    `url` is that base, for other clients (a browser, `requests` in a thread), and `session`
    the aiohttp session underneath, for what `request` does not cover (a streamed answer)."""

    def __init__(self, server: LocalServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    @property
    def url(self) -> str:
        return self.server.url

    async def request(self, method: str, path: str, *, params: Query = None,
                      data: bytes | str | None = None, json: Any = None,
                      headers: Mapping[str, str] | None = None) -> Response:
        """One request; `data` is sent as is (text/plain for str unless a header says
        otherwise), `json` as application/json. Redirects are not followed."""
        if data is not None and json is not None:
            raise ValueError("give data or json, not both")
        sent = dict(headers or {})
        if json is not None:
            data = jsonlib.dumps(json)
            sent.setdefault("Content-Type", "application/json")
        if isinstance(data, str):
            data = data.encode("utf-8")
            if not any(name.lower() == "content-type" for name in sent):
                sent["Content-Type"] = "text/plain; charset=utf-8"
        url = URL(self.server.url + quote_target(path), encoded=True)
        async with self.session.request(method.upper(), url, params=params, data=data,
                                        headers=sent, allow_redirects=False) as resp:
            return Response(resp.status, resp.reason or "", resp.headers, await resp.read())

    async def get(self, path: str, **kwargs: Any) -> Response:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Response:
        return await self.request("POST", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> Response:
        return await self.request("PUT", path, **kwargs)

    async def patch(self, path: str, **kwargs: Any) -> Response:
        return await self.request("PATCH", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> Response:
        return await self.request("DELETE", path, **kwargs)


@contextlib.asynccontextmanager
async def serve(notebook: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                kernels: int = 1, headers: Mapping[str, str] | None = None,
                env: Mapping[str, str] | None = None, **options: Any
                ) -> AsyncIterator[Client]:
    """Serve `notebook` (a path, or several as `kgpool serve` takes them) with `kernels` warm
    kernels and yield a Client. `options` are `kgpool serve`'s settings by their Python names
    (`timeout=5`, `channel="jupyter"`, `auth_token="t"`, `base_url="/v1"`; see
    kgpool.config.Settings); KGPOOL_* variables are not read. `headers` go with every
    request (e.g. the token). Kernels start with `env` (default: this process's environment);
    the live reload is off unless `reload=True`."""
    paths = [notebook] if isinstance(notebook, (str, os.PathLike)) else list(notebook)
    environ = dict(os.environ if env is None else env)
    for name in _NOT_FOR_KERNELS:
        environ.pop(name, None)
    options.setdefault("reload", False)
    settings = Settings(notebooks=tuple(str(Path(p)) for p in paths), kernels=kernels,
                        kernel_env=environ, **options)
    async with LocalServer(settings) as server:
        # cookies kept, as a browser keeps them (aiohttp's default jar ignores 127.0.0.1)
        async with aiohttp.ClientSession(headers=headers,
                                         cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            yield Client(server, session)
