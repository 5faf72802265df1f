"""Batched endpoints: concurrent requests run together, each gets its own answer."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import NOTEBOOKS, Response, Server, wait_for

pytestmark = pytest.mark.timeout(120)
BATCHING = NOTEBOOKS / "batching.ipynb"


@pytest.fixture(scope="module")
def batched() -> Iterator[Server]:
    with Server(BATCHING, "--kernels", "2", "--timeout", "10") as server:
        yield server


def post(server: Server, path: str, body: object, timeout: float = 30) -> Response:
    return server.request("POST", path, body=json.dumps(body),
                          headers={"Content-Type": "application/json"}, timeout=timeout)


def together(server: Server, path: str, bodies: list[object]) -> list[Response]:
    """Send all at once: threads wait at a barrier, then each sends its own request."""
    barrier = threading.Barrier(len(bodies))

    def one(body: object) -> Response:
        barrier.wait(10)
        return post(server, path, body)
    with ThreadPoolExecutor(len(bodies)) as ex:
        return list(ex.map(one, bodies))


def test_each_request_gets_its_own_answer(batched: Server) -> None:
    answers = together(batched, "/double", [{"x": i} for i in range(8)])
    assert [a.status for a in answers] == [200] * 8
    assert [a.json()["x"] for a in answers] == [2 * i for i in range(8)]
    sizes = [a.json()["batch"] for a in answers]
    assert max(sizes) > 1  # some ran together
    assert batched.metric("kgpool_batch_size_count", 'route="/double"') < 8


def test_a_lone_request_waits_no_longer_than_max_wait(batched: Server) -> None:
    alone = batched.metric("kgpool_batch_size_bucket", 'route="/double",le="1.0"')
    answer = post(batched, "/double", {"x": 21})  # nobody else comes: its batch of one runs
    assert answer.json() == {"x": 42, "batch": 1, "pid": answer.json()["pid"]}
    assert batched.metric("kgpool_batch_size_bucket", 'route="/double",le="1.0"') == alone + 1


def test_status_headers_bytes_and_errors_per_request(batched: Server) -> None:
    neg, zero, one, two = together(batched, "/shaped", [{"x": -1}, {"x": 0}, {"x": 1},
                                                        {"x": 2}])
    assert neg.status == 500 and neg.json()["error"] == "ValueError"
    assert neg.json()["message"] == "negative: -1"  # one bad input fails only its own request
    assert (zero.status, zero.headers["X-Why"], zero.body) == (404, "zero", b"none")
    assert (one.status, one.body) == (200, b"\x00\x01")
    assert one.headers["Content-Type"] == "application/octet-stream"
    assert (two.status, two.json()) == (200, {"twice": 4})
    assert two.headers["Content-Type"] == "text/plain"


def test_a_printed_json_list_answers_too(batched: Server) -> None:
    answers = together(batched, "/printed", [{"n": i} for i in range(3)])
    assert [a.json() for a in answers] == [{"n": i} for i in range(3)]


def test_a_wrong_number_of_answers_is_a_clear_500_for_the_batch(batched: Server) -> None:
    answers = together(batched, "/wrong-count", [{"x": i} for i in range(3)])
    batched_ones = [a for a in answers if a.status == 500]
    assert batched_ones, [a.text for a in answers]
    for answer in batched_ones:
        assert answer.json()["error"] == "batch_answers"
        assert "got 1 answer(s)" in answer.json()["message"]


def test_a_cell_that_raises_fails_its_whole_batch(batched: Server) -> None:
    answers = together(batched, "/raises", [{}, {}, {}])
    assert {(a.status, a.json()["message"]) for a in answers} == {(500, "whole batch")}


def test_a_deadline_inside_a_batch_times_out_every_request_in_it() -> None:
    with Server(BATCHING, "--kernels", "1", "--timeout", "1") as server:
        answers = together(server, "/slow", [{"s": 5}, {"s": 5}])
        assert {a.status for a in answers} == {504}
        assert server.get("/calls").status == 200  # the kernel was replaced
        assert server.metric("kgpool_kernel_restarts_total", 'reason="timeout"') == 1


def test_batch_ids_in_the_access_log(batched: Server) -> None:
    together(batched, "/double", [{"x": 1}, {"x": 2}])
    lines = [line for line in batched.output().splitlines()
             if "kgpool.access" in line and "POST /double" in line]
    assert lines and all(" batch=" in line for line in lines)


def test_batches_are_refused_for_other_languages(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "ir", "display_name": "R", "language": "R"},
                   "language_info": {"name": "R"}}
    nb.cells = [nbformat.v4.new_code_cell("# POST /x\n# kgpool: batch\ncat('x')")]
    path = tmp_path / "r.ipynb"
    nbformat.write(nb, path)
    out = subprocess.run([sys.executable, "-m", "kgpool", "serve", str(path), "--port", "0"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode != 0 and "needs a Python kernel" in out.stderr


def test_a_client_that_leaves_a_gathering_batch_is_not_in_it() -> None:
    """Two requests gather (max_wait 1.5 s); the first client leaves before the batch closes:
    the batch runs with the other one alone."""
    with Server(BATCHING, "--kernels", "1", "--log-level", "debug") as server:
        gone = socket.create_connection(("127.0.0.1", server.port))
        gone.sendall(b"POST /patient HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                     b"Content-Type: application/json\r\n\r\n{}")
        wait_for(lambda: "(1 in it)" in server.output(), what="the first request gathering")
        with ThreadPoolExecutor(1) as ex:
            stays = ex.submit(post, server, "/patient", {})
            wait_for(lambda: "(2 in it)" in server.output(), what="both gathering")
            gone.close()
            assert stays.result(10).text == "1"
        assert "POST /patient 499" in server.output()
        assert "a request left the gathering batch" in server.output()
