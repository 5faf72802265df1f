"""HTTP behaviour of a real server on the kitchen-sink notebook: Kernel Gateway's contract."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import Server

pytestmark = pytest.mark.timeout(120)


def test_echo_request_shape(kitchen: Server) -> None:
    resp = kitchen.get("/echo?x=1&x=2&y=&z", headers={"x-lower-case": "v"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain"
    req = json.loads(resp.text)
    assert list(req) == ["body", "args", "path", "headers"]
    assert req["body"] == ""
    assert req["args"] == {"x": ["1", "2"], "y": [""], "z": [""]}
    assert req["path"] == {}
    assert req["headers"]["X-Lower-Case"] == "v"


def test_repeated_header_becomes_list(kitchen: Server) -> None:
    conn_headers = [("X-Multi", "a"), ("X-Multi", "b")]
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", kitchen.port, timeout=30)
    conn.putrequest("GET", "/echo")
    for name, value in conn_headers:
        conn.putheader(name, value)
    conn.endheaders()
    body = conn.getresponse().read()
    conn.close()
    assert json.loads(body)["headers"]["X-Multi"] == ["a", "b"]


@pytest.mark.parametrize("content_type", [
    "application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"])
def test_json_body_parsed_with_parameters(kitchen: Server, content_type: str) -> None:
    resp = kitchen.request("POST", "/echo", body=json.dumps({"a": [1, 2]}),
                           headers={"Content-Type": content_type})
    assert json.loads(resp.text)["body"] == {"a": [1, 2]}


def test_invalid_json_body_stays_text(kitchen: Server) -> None:
    resp = kitchen.request("POST", "/echo", body="{not json",
                           headers={"Content-Type": "application/json"})
    assert json.loads(resp.text)["body"] == "{not json"


@pytest.mark.parametrize("content_type", [
    "application/x-www-form-urlencoded", "application/x-www-form-urlencoded; charset=UTF-8"])
def test_form_body_parsed(kitchen: Server, content_type: str) -> None:
    resp = kitchen.request("POST", "/echo", body="a=1&a=2&b=x+y&c=",
                           headers={"Content-Type": content_type})
    assert json.loads(resp.text)["body"] == {"a": ["1", "2"], "b": ["x y"], "c": [""]}


def test_multipart_fields(kitchen: Server) -> None:
    body = ("--XyZ\r\nContent-Disposition: form-data; name=\"field\"\r\n\r\nvalue one\r\n"
            "--XyZ--\r\n")
    resp = kitchen.request("POST", "/echo", body=body,
                           headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert json.loads(resp.text)["body"] == {"field": ["value one"]}


def test_text_body_verbatim(kitchen: Server) -> None:
    resp = kitchen.request("PUT", "/echo", body="plain\ntext ü".encode(),
                           headers={"Content-Type": "text/plain"})
    assert json.loads(resp.text)["body"] == "plain\ntext ü"


ADVERSARIAL = [
    "'", '"', "'''", '"""', "\\", "\\'", '\\"', "\n", "\r\n", "\\n", "\x00", "\u2028",
    "'; import os; os._exit(1); '", '"); print("pwned"); ("', "\"\"\"\nprint('pwned')\n\"\"\"",
    "{REQUEST}", "%s%d", "${HOME}$(id)`id`", "😀", "\ud7ff", "ünïcödé ∑", "\t\x0b\x0c",
    "#", "\\u0027", "\\x27", "a" * 5000,
]


@pytest.mark.parametrize("value", ADVERSARIAL)
def test_request_bytes_stay_data(kitchen: Server, value: str) -> None:
    from urllib.parse import quote
    header_value = value.encode("utf-8").decode("latin-1") if value.isprintable() and \
        "\n" not in value else "plain"
    resp = kitchen.request(
        "POST", f"/echo?q={quote(value)}", body=json.dumps({"v": value}).encode(),
        headers={"Content-Type": "application/json", "X-Value": header_value})
    assert resp.status == 200, resp.text
    req = json.loads(resp.text)
    assert req["args"]["q"] == [value]
    assert req["body"] == {"v": value}
    # the kernel is intact: the next request on it still works
    assert kitchen.get("/state").status == 200


def test_raw_body_round_trip_with_quotes(kitchen: Server) -> None:
    body = "'''\"\"\"\\\n\r\n\x00end"
    resp = kitchen.request("PUT", "/echo", body=body.encode(),
                           headers={"Content-Type": "text/plain"})
    assert json.loads(resp.text)["body"] == body


def test_path_params_decoded(kitchen: Server) -> None:
    assert kitchen.get("/hello/%C3%A9t%C3%A9%20x").text == "param été x"
    assert kitchen.get("/users/7/files/a%2Fb").text == json.dumps({"uid": "7", "fid": "a/b"})


def test_route_precedence_fixed_before_param(kitchen: Server) -> None:
    assert kitchen.get("/hello/world").text == "fixed"
    assert kitchen.get("/hello/there").text == "param there"
    assert kitchen.get("/whatever").text == "root param"
    assert kitchen.get("/hello/a/b").status == 404  # a parameter is one segment


def test_literal_characters_match_literally(kitchen: Server) -> None:
    assert kitchen.get("/a.b").text == "literal dot"
    assert kitchen.get("/aXb").text == "root param"  # not the /a.b route


def test_trailing_slash_is_significant(kitchen: Server) -> None:
    assert kitchen.get("/trail/").text == "trailing"
    assert kitchen.get("/trail").text == "root param"


def test_unknown_path_404_json(kitchen: Server) -> None:
    resp = kitchen.get("/no/such/path")
    assert resp.status == 404
    assert resp.json()["error"] == "not_found"


def test_undefined_method_405_without_kernel(kitchen: Server) -> None:
    # both kernels busy for 2 s: a 405 must not wait behind them
    with ThreadPoolExecutor(2) as ex:
        busy = [ex.submit(kitchen.get, "/sleep?s=2") for _ in range(2)]
        kitchen.wait_pool("both kernels busy", busy=2)
        resp = kitchen.request("DELETE", "/echo")
        missing = kitchen.get("/nothing/here/at/all")
        assert not any(f.done() for f in busy)  # answered while both kernels were busy
        assert [f.result().status for f in busy] == [200, 200]
    assert resp.status == 405
    assert resp.headers["Allow"] == "GET, POST, PUT"
    assert resp.json()["error"] == "method_not_allowed"
    assert missing.status == 404


def test_other_methods_on_param_route(kitchen: Server) -> None:
    assert kitchen.request("DELETE", "/items/42").text == "deleted 42"
    assert kitchen.request("PATCH", "/items/42").text == "patched 42"
    assert kitchen.request("PUT", "/items/42").status == 405


def test_cell_error_500_json(kitchen: Server) -> None:
    resp = kitchen.get("/raise")
    assert resp.status == 500
    assert resp.json() == {"error": "ValueError", "message": 'boom "quoted"',
                           "reason": "Internal Server Error"}


def test_input_is_an_error_not_a_hang(kitchen: Server) -> None:
    started = time.monotonic()
    resp = kitchen.get("/input")
    assert resp.status == 500
    assert "StdinNotImplementedError" in resp.json()["error"]
    assert time.monotonic() - started < 5
    assert kitchen.get("/state").status == 200


def test_execute_result_when_no_stdout(kitchen: Server) -> None:
    assert kitchen.get("/result").json() == {"text/plain": "2"}
    empty = kitchen.get("/empty")
    assert (empty.status, empty.body) == (200, b"")


def test_stderr_ignored(kitchen: Server) -> None:
    assert kitchen.get("/stderr").text == "to stdout"


def test_cells_with_same_annotation_joined(kitchen: Server) -> None:
    assert kitchen.get("/joined").text == "first+second"


def test_response_info_status_and_headers(kitchen: Server) -> None:
    resp = kitchen.request("POST", "/created")
    assert resp.status == 201
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.headers["X-Hits"] == str(resp.json()["hits"])


def test_response_info_not_json_is_500(kitchen: Server) -> None:
    resp = kitchen.get("/badinfo")
    assert resp.status == 500
    assert resp.json()["error"] == "bad_response_info"


def test_204_drops_body(kitchen: Server) -> None:
    resp = kitchen.get("/nocontent")
    assert (resp.status, resp.body) == (204, b"")


def test_init_ran_once_per_kernel_and_endpoints_never_at_warmup(kitchen: Server) -> None:
    states = {}
    for _ in range(6):
        state = kitchen.get("/state").json()
        states[state["pid"]] = state["init_runs"]
    assert len(states) == 2  # both kernels served
    assert set(states.values()) == {1}


def test_swagger_spec(kitchen: Server) -> None:
    spec = kitchen.get("/_api/spec/swagger.json").json()
    assert spec["swagger"] == "2.0"
    assert spec["info"]["title"] == "kitchen"
    ok = {"responses": {"200": {"description": "Success"}}}
    assert spec["paths"]["/hello/:name"] == {"get": ok}
    assert set(spec["paths"]["/echo"]) == {"get", "post", "put"}


def test_health_and_readiness(kitchen: Server) -> None:
    assert kitchen.get("/healthz").json() == {"status": "ok"}
    ready = kitchen.get("/readyz")
    assert ready.status == 200
    assert ready.json()["kernels"]["desired"] == 2


def test_request_id_echoed_or_generated(kitchen: Server) -> None:
    assert kitchen.get("/state", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] \
        == "abc-123"
    assert len(kitchen.get("/state").headers["X-Request-ID"]) >= 16
    odd = kitchen.get("/state", headers={"X-Request-ID": "bad\xff id"}).headers["X-Request-ID"]
    assert odd.isascii() and len(odd) == 32  # replaced, not echoed
