"""Untrusted clients: token auth, body and header limits, CORS, and errors that leak nothing."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

import pytest
from conftest import NOTEBOOKS, Server, wait_for

pytestmark = pytest.mark.timeout(120)
TOKEN = "s3cret-t0ken"
FUZZ = NOTEBOOKS / "fuzz.ipynb"


@pytest.fixture(scope="module")
def guarded() -> Iterator[Server]:
    server = Server(FUZZ, "--kernels", "1", "--max-body-size", "1000",
                    "--allow-origin", "http://good.example,http://also.example",
                    "--allow-methods", "GET,POST", "--allow-headers", "Content-Type,X-Custom",
                    "--max-age", "321", env={"KGPOOL_AUTH_TOKEN": TOKEN})
    with server:
        yield server


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_token_required_with_json_401(guarded: Server) -> None:
    for headers in ({}, bearer("wrong"), {"Authorization": TOKEN}, {"Authorization": "Basic x"}):
        resp = guarded.get("/echo", headers=headers)
        assert resp.status == 401
        assert resp.json()["error"] == "unauthorized"
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert guarded.get("/echo", headers=bearer()).status == 200
    assert guarded.get("/echo", headers={"Authorization": f"token {TOKEN}"}).status == 200
    # a token that is not even UTF-8 is just a wrong token (http.client sends latin-1 bytes)
    assert guarded.get("/echo", headers={"Authorization": "Bearer \xff\xfe"}).status == 401


def test_probes_and_metrics_stay_open(guarded: Server) -> None:
    assert guarded.get("/healthz").status == 200
    assert guarded.get("/readyz").status == 200
    assert guarded.get("/metrics").status == 200
    assert guarded.get("/_api/spec/swagger.json").status == 401


@pytest.mark.channel_independent  # kgpool's own endpoints only: no request reaches a kernel
def test_metrics_can_be_protected() -> None:
    with Server(FUZZ, "--metrics-auth", env={"KGPOOL_AUTH_TOKEN": TOKEN}) as server:
        assert server.get("/metrics").status == 401
        assert server.get("/metrics", headers=bearer()).status == 200
        assert server.get("/healthz").status == 200


def test_token_never_reaches_the_notebook(guarded: Server) -> None:
    req = json.loads(guarded.get("/echo?x=1", headers=bearer()).text)
    assert "Authorization" not in req["headers"]
    assert TOKEN not in json.dumps(req)
    env = guarded.get("/env", headers=bearer()).text
    assert TOKEN not in env and "KGPOOL_AUTH_TOKEN" not in env


def test_body_too_large_is_413_before_any_kernel(guarded: Server) -> None:
    ok = guarded.request("POST", "/echo", body=b"x" * 1000, headers=bearer())
    assert ok.status == 200
    resp = guarded.request("POST", "/echo", body=b"x" * 1001, headers=bearer())
    assert resp.status == 413
    assert resp.json()["error"] == "payload_too_large"


def test_chunked_body_too_large_is_413(guarded: Server) -> None:
    sock = socket.create_connection(("127.0.0.1", guarded.port), timeout=10)
    head = (f"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"x" * 600
    sock.sendall(head + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2 + b"0\r\n\r\n")
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413")
    assert b'"error": "request_entity_too_large"' in answer or b"payload_too_large" in answer


def test_slow_client_never_holds_a_kernel(guarded: Server) -> None:
    sock = socket.create_connection(("127.0.0.1", guarded.port), timeout=10)
    sock.sendall((f"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  "Content-Length: 100\r\n\r\nonly-part").encode())
    wait_for(lambda: guarded.metric("kgpool_requests_in_flight") == 1,
             what="the slow request to be reading its body")
    assert guarded.pool()["busy"] == 0 and guarded.pool()["queued"] == 0
    assert guarded.get("/echo", headers=bearer()).status == 200  # the one kernel is free
    sock.close()


def test_oversized_header_is_rejected(guarded: Server) -> None:
    resp = guarded.get("/echo", headers={**bearer(), "X-Big": "a" * 20000})
    assert resp.status == 400


def test_preflight_answered_without_a_kernel(guarded: Server) -> None:
    with ThreadPoolExecutor(1) as ex:
        busy = ex.submit(guarded.get, "/echo", headers=bearer())  # may or may not overlap
        started = time.monotonic()
        resp = guarded.request("OPTIONS", "/echo", headers={
            "Origin": "http://good.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-custom"})
        assert time.monotonic() - started < 2
        busy.result()
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "http://good.example"
    assert resp.headers["Access-Control-Allow-Methods"] == "GET,POST"
    assert resp.headers["Access-Control-Allow-Headers"] == "Content-Type,X-Custom"
    assert resp.headers["Access-Control-Max-Age"] == "321"


def test_cors_headers_only_for_allowed_origins(guarded: Server) -> None:
    allowed = guarded.get("/echo", headers={**bearer(), "Origin": "http://also.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "http://also.example"
    assert "X-Request-ID" in allowed.headers["Access-Control-Expose-Headers"]
    refused = guarded.get("/echo", headers={**bearer(), "Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in refused.headers
    assert refused.headers["Vary"] == "Origin"  # caches must not reuse it for another origin
    assert guarded.get("/echo", headers=bearer()).headers["Vary"] == "Origin"
    preflight = guarded.request("OPTIONS", "/echo", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
    assert preflight.status == 403 and "Access-Control-Allow-Origin" not in preflight.headers
    # a 401 still carries CORS headers, so a browser can read why
    denied = guarded.get("/echo", headers={"Origin": "http://good.example"})
    assert denied.status == 401
    assert denied.headers["Access-Control-Allow-Origin"] == "http://good.example"


def test_no_cors_headers_unless_configured() -> None:
    with Server(FUZZ) as server:
        resp = server.get("/echo", headers={"Origin": "http://good.example"})
        assert "Access-Control-Allow-Origin" not in resp.headers
        preflight = server.request("OPTIONS", "/echo", headers={
            "Origin": "http://good.example", "Access-Control-Request-Method": "GET"})
        assert "Access-Control-Allow-Origin" not in preflight.headers


@pytest.mark.parametrize("method,path,status", [
    ("POST", "/healthz", 405), ("DELETE", "/metrics", 405), ("GET", "/%ff%fe", 400),
    ("PUT", "/echo", 405)])
def test_kgpool_errors_are_json_without_internals(guarded: Server, method: str, path: str,
                                                  status: int) -> None:
    resp = guarded.request(method, path, headers=bearer())
    assert resp.status == status
    body = resp.json()
    assert set(body) == {"error", "message", "reason"}
    assert body["reason"] == HTTPStatus(resp.status).phrase  # what Kernel Gateway's clients read
    assert "Traceback" not in resp.text and "/kgpool/" not in resp.text


def test_cell_traceback_only_behind_the_flag() -> None:
    kitchen = NOTEBOOKS / "kitchen.ipynb"
    with Server(kitchen) as plain:
        body = plain.get("/raise").json()
        assert body == {"error": "ValueError", "message": 'boom "quoted"',
                        "reason": "Internal Server Error"}
    with Server(kitchen, "--expose-traceback") as debug:
        body = debug.get("/raise").json()
        assert body["error"] == "ValueError"
        trace = "\n".join(body["traceback"])
        assert "ValueError" in trace and "raise ValueError" in trace
        assert "\x1b[" not in trace
