"""aiohttp hello-world: the ceiling of the framework kgpool is built on, on this machine.

`GET /convert` answers the bytes the convert notebook answers for `?angle=180`, so wrk's body
check (check.lua) passes unchanged; nothing else is served. aiohttp's default access log is
on (`web.run_app`'s access logger at INFO, to stderr, which the benchmark sends to a file), as
every server in the rotation keeps its default logging. Started by bench.py as the server kind
`aiohttp-hello`, with the bench venv's python:

    .venv-bench/bin/python benchmarks/hello.py --port 8888
"""

from __future__ import annotations

import argparse
import logging

from aiohttp import web

BODY = b'{"convertedAngle": 3.141592653589793}\n'


async def convert(request: web.Request) -> web.Response:  # noqa: ARG001
    return web.Response(body=BODY, content_type="application/json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = web.Application()
    app.router.add_get("/convert", convert)
    web.run_app(app, host=args.host, port=args.port, print=None)  # SIGTERM: graceful exit


if __name__ == "__main__":
    main()
