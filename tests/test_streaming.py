"""Streamed answers: what the cell prints reaches the client as it is printed."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator

import pytest
from conftest import NOTEBOOKS, Server, wait_for

pytestmark = pytest.mark.timeout(120)
STREAMING = NOTEBOOKS / "streaming.ipynb"


@pytest.fixture(scope="module")
def streamer() -> Iterator[Server]:
    with Server(STREAMING, "--kernels", "1", "--timeout", "10",
                "--max-response-size", "100000") as server:
        yield server


def chunks(server: Server, path: str, complete: bool = True
           ) -> tuple[http.client.HTTPResponse, list[tuple[float, bytes]]]:
    """(response, [(seconds since the request, bytes read)]) as the bytes arrive; `complete`:
    whether the stream must end properly (else it must be cut off)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    started = time.monotonic()
    conn.request("GET", path)
    resp = conn.getresponse()
    got, cut = [], False
    while True:
        try:
            data = resp.read1(65536)
        except (http.client.IncompleteRead, ValueError):  # no last chunk: cut off
            cut = True
            break
        if not data:
            break
        got.append((time.monotonic() - started, data))
    conn.close()
    assert cut is not complete
    return resp, got


def test_printed_lines_arrive_as_they_are_printed(streamer: Server) -> None:
    resp, got = chunks(streamer, "/tokens")
    assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
    assert b"".join(d for _, d in got) == b"".join(b"token %d\n" % i for i in range(5))
    first = next(t for t, d in got if b"token 0" in d)
    last = next(t for t, d in got if b"token 4" in d)
    assert last - first >= 0.6  # they came 200 ms apart, not all at the end


def test_server_sent_events_one_per_line(streamer: Server) -> None:
    resp, got = chunks(streamer, "/events")
    assert resp.getheader("Content-Type") == "text/event-stream"
    assert resp.getheader("Cache-Control") == "no-cache"
    events = b"".join(d for _, d in got).decode().split("\n\n")
    assert events[:5] == [f"data: event {i}" for i in range(5)]
    assert events[5:] == ["event: end\ndata: ", ""]  # an EventSource closes, not reconnects


def test_cr_lf_and_crlf_each_end_an_event(streamer: Server) -> None:
    _, got = chunks(streamer, "/lines")  # "a\r\nb\rc", "\r", "\nd\n" printed apart
    events = b"".join(d for _, d in got).decode().split("\n\n")
    assert events == ["data: a", "data: b", "data: c", "data: d", "event: end\ndata: ", ""]


def test_displays_are_events_of_their_own(streamer: Server) -> None:
    _, got = chunks(streamer, "/shown")
    events = b"".join(d for _, d in got).decode().split("\n\n")
    assert events[0] == "data: first" and events[2] == "data: last"
    kind, data = events[1].split("\n")
    assert kind == "event: display" and json.loads(data[6:])["text/html"] == "<b>x</b>"


def test_response_info_status_and_headers_come_first(streamer: Server) -> None:
    resp, got = chunks(streamer, "/styled")
    assert resp.status == 201 and resp.getheader("X-Stream") == "yes"
    assert b"".join(d for _, d in got) == b"data: styled\n\nevent: end\ndata: \n\n"


def test_an_error_before_any_output_is_a_plain_500(streamer: Server) -> None:
    resp = streamer.get("/fails-early")
    assert resp.status == 500 and resp.json()["message"] == "before any output"


def test_an_error_midway_ends_the_stream_with_an_error_event(streamer: Server) -> None:
    _, got = chunks(streamer, "/fails")
    events = b"".join(d for _, d in got).decode().split("\n\n")
    assert events[0] == "data: partial"
    assert events[1].startswith("event: error\ndata: ")
    assert json.loads(events[1].split("data: ", 1)[1])["message"] == "midway"


def test_a_stream_past_the_response_limit_stops_and_the_kernel_is_kept(
        streamer: Server) -> None:
    pid = streamer.kernel_pids()
    resp, got = chunks(streamer, "/flood", complete=False)  # chunked: cut off, not ended
    assert sum(len(d) for _, d in got) <= 110000  # stopped near the limit
    streamer.wait_pool("the kernel back", idle=1)
    assert streamer.kernel_pids() == pid


def leave_mid_stream(server: Server, path: str) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    seen = b""
    while b"tick" not in seen:
        seen += sock.recv(4096)
    sock.close()


def test_a_client_that_leaves_mid_stream_stops_the_cell_and_the_kernel_is_kept() -> None:
    with Server(STREAMING, "--kernels", "1", "--timeout", "60") as server:
        pid = server.kernel_pids()
        leave_mid_stream(server, "/forever")  # it would print until its deadline
        wait_for(lambda: server.pool()["idle"] == 1, what="the cell stopped, the kernel back")
        assert server.kernel_pids() == pid
        assert server.metric("kgpool_kernel_restarts_total") == 0
        resp, got = chunks(server, "/tokens")  # and it serves the next one whole
        assert b"".join(d for _, d in got) == b"".join(b"token %d\n" % i for i in range(5))


def test_a_cell_that_shrugs_off_the_interrupt_is_stopped_at_its_deadline() -> None:
    with Server(STREAMING, "--kernels", "1", "--timeout", "2") as server:
        pid = server.kernel_pids()
        leave_mid_stream(server, "/stubborn")
        wait_for(lambda: server.pool()["idle"] == 1 and server.pool()["starting"] == 0
                 and server.metric("kgpool_kernel_restarts_total", 'reason="timeout"') == 1,
                 what="the kernel stopped at the deadline and replaced")
        assert server.kernel_pids() != pid
        resp, got = chunks(server, "/tokens")
        assert b"token 4" in b"".join(d for _, d in got)


def test_an_endless_stream_past_the_limit_is_stopped_and_the_kernel_kept(
        streamer: Server) -> None:
    pid = streamer.kernel_pids()
    restarts = streamer.metric("kgpool_kernel_restarts_total")
    resp, got = chunks(streamer, "/endless", complete=False)
    assert sum(len(d) for _, d in got) <= 110000
    streamer.wait_pool("the kernel back", idle=1)
    assert streamer.kernel_pids() == pid
    assert streamer.metric("kgpool_kernel_restarts_total") == restarts


def test_a_stream_that_prints_nothing_is_an_empty_answer(streamer: Server) -> None:
    resp = streamer.get("/quiet")
    assert (resp.status, resp.body) == (200, b"")
