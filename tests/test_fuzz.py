"""Fuzzing: any query, header or body bytes round-trip exactly through an echo endpoint
(hypothesis), and schemathesis finds no 5xx of kgpool's own against the OpenAPI document."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote_from_bytes

import pytest
from conftest import NOTEBOOKS, Server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(300)
EXAMPLES = int(os.environ.get("KGPOOL_FUZZ_EXAMPLES", "150"))
FUZZ = NOTEBOOKS / "fuzz.ipynb"


@pytest.fixture(scope="module")
def echo() -> Iterator[Server]:
    with Server(FUZZ, "--kernels", "2", "--max-body-size", str(4 * 1024 * 1024)) as server:
        yield server


def raw(server: Server, method: str, target: str, headers: list[tuple[str, bytes]],
        body: bytes = b"") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def exact(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


PROFILE = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture,
                                          HealthCheck.too_slow, HealthCheck.data_too_large])
# header values: visible ASCII and obs-text bytes, inner spaces and tabs, nothing at the ends
HEADER_VALUE = st.binary(min_size=1, max_size=300).map(
    lambda b: bytes(c for c in b if c >= 0x21 and c != 0x7f) or b"x").flatmap(
    lambda core: st.sampled_from([core, core[:1] + b" \t" + core]))


@PROFILE
@given(key=st.binary(min_size=1, max_size=40), values=st.lists(st.binary(max_size=200),
                                                                min_size=1, max_size=3))
def test_query_bytes_round_trip(echo: Server, key: bytes, values: list[bytes]) -> None:
    query = "&".join(f"{quote_from_bytes(key)}={quote_from_bytes(v)}" for v in values)
    status, body = raw(echo, "GET", f"/echo?{query}", [])
    assert status == 200
    args = json.loads(body)["args"]
    assert [exact(v) for v in args[key.decode("utf-8", "surrogateescape")]] == values


@PROFILE
@given(value=HEADER_VALUE)
def test_header_bytes_round_trip(echo: Server, value: bytes) -> None:
    status, body = raw(echo, "GET", "/echo", [("X-Fuzz", value)])
    assert status == 200
    assert exact(json.loads(body)["headers"]["X-Fuzz"]) == value


@PROFILE
@given(body=st.binary(max_size=4096))
def test_body_bytes_round_trip(echo: Server, body: bytes) -> None:
    status, answer = raw(echo, "POST", "/echo", [("Content-Type", b"application/octet-stream")],
                         body)
    assert status == 200
    assert exact(json.loads(answer)["body"]) == body


@PROFILE
@given(document=st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20))
def test_json_body_round_trip(echo: Server, document: object) -> None:
    payload = json.dumps(document).encode("utf-8", "surrogatepass")
    status, answer = raw(echo, "POST", "/echo",
                         [("Content-Type", b"application/json; charset=utf-8")], payload)
    assert status == 200
    assert json.loads(answer)["body"] == json.loads(payload)


def test_huge_values_round_trip(echo: Server) -> None:
    big_body = bytes(range(256)) * 12000  # ~3 MB, every byte value
    status, answer = raw(echo, "POST", "/echo", [("Content-Type", b"text/plain")], big_body)
    assert status == 200 and exact(json.loads(answer)["body"]) == big_body
    big_header = b"h" * 7000
    status, answer = raw(echo, "GET", "/echo?" + "q=" + "%ff" * 2000, [("X-Big", big_header)])
    assert status == 200
    req = json.loads(answer)
    assert exact(req["headers"]["X-Big"]) == big_header
    assert exact(req["args"]["q"][0]) == b"\xff" * 2000


def test_schemathesis_finds_no_kgpool_5xx(tmp_path: Path) -> None:
    with Server(FUZZ, "--kernels", "2", "--timeout", "20") as server:
        before = server.kernel_pids()
        url = f"http://127.0.0.1:{server.port}"
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/_api/spec/openapi.json",
             "--checks", "not_a_server_error", "--max-examples", str(max(EXAMPLES // 5, 10)),
             "--seed", "1", "--workers", "2", "--request-timeout", "30",
             "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml")],
            capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL, cwd=tmp_path)
        print(run.stdout[-4000:])
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert "passed" in run.stdout.lower()
        # the server is healthy after the fuzzing: N warm kernels, the same ones, right answers
        ready = server.get("/readyz").json()
        assert ready["kernels"]["idle"] + ready["kernels"]["busy"] == 2
        assert sorted(server.kernel_pids()) == sorted(before)
        assert json.loads(server.get("/convert?angle=180").text) == \
            {"convertedAngle": 3.141592653589793}
