"""Slow and greedy clients: heads and bodies that never finish, more connections than allowed.
Each must be ended by the server, which keeps answering others and gives its descriptors back."""

from __future__ import annotations

import http.client
import json
import os
import select
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import NOTEBOOKS, Server

pytestmark = pytest.mark.timeout(120)
FUZZ = NOTEBOOKS / "fuzz.ipynb"
KITCHEN = NOTEBOOKS / "kitchen.ipynb"


def wait_for(predicate: Callable[[], object], timeout: float = 30.0,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def open_fds(server: Server) -> int:
    assert server.proc is not None
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def held(server: Server) -> int:
    """Client connections the server process has a descriptor for (its listener aside)."""
    assert server.proc is not None
    inodes = set()
    for fd in os.listdir(f"/proc/{server.proc.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{server.proc.pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if port == server.port and fields[3] != "0A" and fields[9] in inodes:
                count += 1
    return count


def settled_fds(server: Server) -> int:
    """The server's descriptor count once no client connection is open."""
    wait_for(lambda: held(server) == 0, what="no client connection")
    return open_fds(server)


OPENED: list[socket.socket] = []


@pytest.fixture(autouse=True)
def close_sockets() -> Iterator[None]:
    """Every socket a test opened is closed, also when it fails half-way."""
    yield
    while OPENED:
        OPENED.pop().close()


def connect(server: Server, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    OPENED.append(sock)
    if data:
        sock.sendall(data)
    return sock


def read_until_closed(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection (the event waited for)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return b"".join(chunks)


def json_error(answer: bytes, status: int) -> dict[str, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    error = json.loads(body)
    assert set(error) == {"error", "message", "reason"}
    return error


def metric(server: Server, name: str, label: str) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} series with {label}")


@pytest.fixture(scope="module")
def headers_1s() -> Iterator[Server]:
    with Server(KITCHEN, "--kernels", "1", "--header-timeout", "1") as server:
        yield server


def test_slow_loris_heads_are_cut_off_and_descriptors_freed(headers_1s: Server) -> None:
    server = headers_1s
    baseline = settled_fds(server)
    slow = [connect(server, b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Slow: ") for _ in range(20)]
    silent = [connect(server) for _ in range(5)]  # connect and never say a word
    wait_for(lambda: held(server) == 25, what="the server to accept them all")
    assert server.get("/healthz").status == 200  # others are served meanwhile
    assert server.get("/echo").status == 200
    for sock in slow:
        error = json_error(read_until_closed(sock), 408)
        assert error["error"] == "header_timeout" and error["reason"] == "Request Timeout"
    for sock in silent:
        assert read_until_closed(sock) == b""  # closed without a word either
    wait_for(lambda: open_fds(server) <= baseline, what="the descriptors to be freed")
    assert metric(server, "kgpool_connections_closed_total", 'reason="header_timeout"') >= 25


def test_a_trickling_head_is_cut_off_too(headers_1s: Server) -> None:
    """The deadline covers the whole head, not the gap between two bytes."""
    sock = connect(server=headers_1s, data=b"GET /echo HTTP/1.1\r\n")
    closed = False
    for _ in range(200):  # one byte each time the server has said nothing for 0.1 s
        if select.select([sock], [], [], 0.1)[0]:
            closed = True
            break
        sock.sendall(b"X")
    assert closed, "the server kept a trickling head open"
    error = json_error(read_until_closed(sock), 408)
    assert error["error"] == "header_timeout"


def test_the_next_head_on_a_keepalive_connection_has_its_deadline_too(
        headers_1s: Server) -> None:
    """One timer serves a connection's heads: armed for the first, it must still cut off a
    later one that trickles (and not before that head's own second is up)."""
    conn = http.client.HTTPConnection("127.0.0.1", headers_1s.port, timeout=30)
    conn.request("GET", "/echo")
    assert conn.getresponse().read()
    sock = conn.sock
    OPENED.append(sock)
    # idle for half the deadline (keep-alive's business), so that the timer armed for the
    # first head comes due while the second one is only half its deadline old
    assert not select.select([sock], [], [], 0.5)[0], "the idle connection was closed"
    sock.sendall(b"GET /echo HTTP/1.1\r\n")
    began = time.monotonic()
    closed = False
    for _ in range(200):
        if select.select([sock], [], [], 0.1)[0]:
            closed = True
            break
        sock.sendall(b"X")
    assert closed, "the second head was never cut off"
    assert time.monotonic() - began >= 0.9  # its own deadline, not the first head's
    rest = read_until_closed(sock)
    error = json_error(rest[rest.index(b"HTTP/1.1 408"):], 408)
    assert error["error"] == "header_timeout"


def test_the_head_deadline_spares_slow_requests_and_idle_keepalive(headers_1s: Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", headers_1s.port, timeout=30)
    try:
        conn.request("GET", "/sleep?s=2")  # runs past the 1 s head deadline
        assert conn.getresponse().read().decode().isdigit()
        idle = select.select([conn.sock], [], [], 1.5)[0]  # idle past it: keep-alive's business
        assert not idle, "an idle keep-alive connection was closed by the head deadline"
        conn.request("GET", "/echo")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_slow_body_gets_408_and_never_reaches_a_kernel() -> None:
    with Server(FUZZ, "--kernels", "1", "--body-timeout", "1") as server:
        baseline = settled_fds(server)
        socks = [connect(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                                 b"Content-Type: text/plain\r\n\r\nonly-part") for _ in range(10)]
        wait_for(lambda: held(server) == 10, what="the server to accept them")
        assert server.get("/readyz").json()["kernels"]["busy"] == 0
        assert server.request("POST", "/echo", body=b"fast").status == 200
        for sock in socks:
            error = json_error(read_until_closed(sock), 408)
            assert error["error"] == "body_timeout" and "1s" in error["message"]
        wait_for(lambda: open_fds(server) <= baseline, what="the descriptors to be freed")
        ok = server.request("POST", "/echo", body=b"x" * 5000)  # a whole body still works
        assert ok.status == 200 and json.loads(ok.text)["body"] == "x" * 5000


def test_body_deadline_is_not_applied_to_unknown_paths_or_without_a_body() -> None:
    with Server(FUZZ, "--kernels", "1", "--body-timeout", "1") as server:
        sock = connect(server, b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                               b"\r\nabc")
        error = json_error(read_until_closed(sock), 404)  # answered at once, body unread
        assert error["error"] == "not_found"
        assert server.get("/echo").status == 200


def test_connection_limit_answers_503_at_once_and_frees_descriptors() -> None:
    with Server(FUZZ, "--kernels", "1", "--max-connections", "4",
                "--header-timeout", "60") as server:
        baseline = settled_fds(server)
        holding = [connect(server, b"GET /echo HTTP/1.1\r\nHost: x\r\n") for _ in range(4)]
        wait_for(lambda: held(server) == 4, what="four held connections")
        for _ in range(30):  # refused promptly, never queued: each gets its answer
            sock = connect(server, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            error = json_error(read_until_closed(sock), 503)
            assert error["error"] == "too_many_connections"
        silent = connect(server)  # says nothing: answered all the same
        assert json_error(read_until_closed(silent), 503)["error"] == "too_many_connections"
        # a liveness probe still passes, even amid a flood of slow refused ones: the server
        # is alive, only full
        flood = [connect(server, b"GET /echo HTTP/1.1\r\n") for _ in range(40)]
        assert server.get("/healthz").json() == {"status": "ok"}
        for sock in flood:
            assert json_error(read_until_closed(sock), 503)["error"] == "too_many_connections"
        assert server.get("/_kgpool/healthz").status == 200
        assert server.get("/readyz").status == 503
        wait_for(lambda: held(server) == 4, what="refused ones to be closed")
        for sock in holding:
            sock.close()
        wait_for(lambda: server.get("/echo").status == 200, what="room again")
        assert metric(server, "kgpool_connections_closed_total", 'reason="limit"') >= 74
        wait_for(lambda: open_fds(server) <= baseline, what="the descriptors to be freed")


def test_idle_keepalive_connections_make_room_for_new_ones() -> None:
    clients: list[http.client.HTTPConnection] = []

    def client() -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        clients.append(conn)
        conn.request("GET", "/echo")
        assert conn.getresponse().read()  # answered; the connection stays open, idle
        return conn

    with Server(FUZZ, "--kernels", "1", "--max-connections", "3") as server:
        try:
            idle = [client() for _ in range(3)]
            newer = [client() for _ in range(3)]  # each served: the oldest idle one made room
            for conn in idle:
                assert conn.sock is not None
                assert select.select([conn.sock], [], [], 10)[0]  # the server closed it
                assert conn.sock.recv(1) == b""
                conn.close()
            for conn in newer:  # the newer ones still work, on the same connections
                conn.request("GET", "/echo")
                assert conn.getresponse().read()
                conn.close()
            wait_for(lambda: held(server) == 0, what="the newer ones to be closed")
            assert metric(server, "kgpool_connections_closed_total", 'reason="idle"') == 3
        finally:
            for conn in clients:
                conn.close()


@pytest.mark.channel_independent  # settled at start-up: no request reaches a kernel
def test_descriptor_limit_is_raised_to_fit_the_connection_limit() -> None:
    if shutil.which("prlimit") is None:
        pytest.skip("no prlimit to start kgpool with a low descriptor limit")

    def soft_limit(server: Server) -> int:
        assert server.proc is not None
        limits = Path(f"/proc/{server.proc.pid}/limits").read_text().splitlines()
        return int(next(line for line in limits if line.startswith("Max open files")).split()[3])

    roomy = Server(FUZZ, "--max-connections", "1000")
    roomy.args = ["prlimit", "--nofile=256:4096", *roomy.args]
    with roomy:
        assert soft_limit(roomy) >= 1000
    tight = Server(FUZZ, "--max-connections", "1000")
    tight.args = ["prlimit", "--nofile=256:600", *tight.args]
    with tight:
        assert soft_limit(tight) == 600  # as far as it may go, and a warning why not more
        assert "--max-connections 1000 needs about" in tight.output()
