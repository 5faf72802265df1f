"""`kgpool call NOTEBOOK "GET /path"`: one request through a temporary server, printed as
`curl -i` prints it; exit statuses; nothing left behind (no kernel, no file)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import EXAMPLE, NOTEBOOKS, alive, kernel_children, wait_for, wait_gone

pytestmark = pytest.mark.timeout(120)

KITCHEN = NOTEBOOKS / "kitchen.ipynb"


@dataclass
class Outcome:
    code: int
    stdout: bytes
    stderr: str
    left_files: list[str]  # what the call left in its TMPDIR and Jupyter runtime folder
    left_kernels: list[int]

    @property
    def head(self) -> list[str]:
        return self.stdout.split(b"\n\n", 1)[0].decode("latin-1").split("\n")

    @property
    def body(self) -> bytes:
        return self.stdout.split(b"\n\n", 1)[1]

    def header(self, name: str) -> str:
        found = [line.split(":", 1)[1].strip() for line in self.head[1:]
                 if line.split(":", 1)[0].lower() == name.lower()]
        assert len(found) == 1, (name, self.head)
        return found[0]


@pytest.fixture
def private() -> Iterator[Path]:
    """A TMPDIR and Jupyter runtime folder of the call's own, checked empty afterwards."""
    with tempfile.TemporaryDirectory(prefix="kgpool-test-call-") as folder:
        yield Path(folder)


def start(private: Path, *args: str, env: dict[str, str] | None = None
          ) -> subprocess.Popen[bytes]:
    tmp, runtime = private / "tmp", private / "runtime"
    tmp.mkdir(exist_ok=True)
    runtime.mkdir(exist_ok=True)
    environ = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    environ.update(TMPDIR=str(tmp), JUPYTER_RUNTIME_DIR=str(runtime), **(env or {}))
    # SIGINT as a terminal gives it, even when the suite runs as a background job (which
    # starts with SIGINT ignored, and children inherit that: Ctrl-C would then do nothing)
    return subprocess.Popen([sys.executable, "-m", "kgpool", "call", *args], env=environ,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(private: Path, proc: subprocess.Popen[bytes], stdin: bytes = b"",
           seen: list[int] | None = None) -> Outcome:
    try:
        out, err = proc.communicate(stdin, timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    # the call waits for its kernel to end before it exits: none may be alive now
    left = [pid for pid in {*(seen or ()), *kernel_children(proc.pid)} if alive(pid)]
    wait_gone(left)  # (then cleaned up by the autouse check, if one is)
    files = sorted(str(p.relative_to(private)) for p in private.rglob("*")
                   if p.parent != private)
    return Outcome(proc.returncode, out, err.decode(errors="replace"), files, left)


def call(private: Path, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
         ) -> Outcome:
    return finish(private, start(private, *args, env=env), stdin)


def test_get_prints_status_headers_and_body(private: Path) -> None:
    out = call(private, str(EXAMPLE), "GET /convert?angle=180")
    assert out.code == 0, out.stderr
    assert out.head[0] == "HTTP/1.1 200 OK"
    assert out.header("Content-Type") == "text/plain"
    assert out.header("X-Request-ID")
    assert int(out.header("Content-Length")) == len(out.body)
    assert out.body.strip() == b'{"convertedAngle": 3.141592653589793}'
    assert out.left_files == [] and out.left_kernels == []


def test_unknown_path_is_404_and_exit_4(private: Path) -> None:
    out = call(private, str(KITCHEN), "GET /no/such/endpoint")
    assert out.code == 4
    assert out.head[0] == "HTTP/1.1 404 Not Found"
    assert json.loads(out.body)["error"] == "not_found"
    assert out.left_files == [] and out.left_kernels == []


def test_post_with_body_and_content_type(private: Path) -> None:
    out = call(private, str(KITCHEN), "POST /echo", "-d", "a=1&b=two",
               "-H", "Content-Type: application/x-www-form-urlencoded", "-H", "X-Thing: yes")
    assert out.code == 0, out.stderr
    request = json.loads(out.body)
    assert request["body"] == {"a": ["1"], "b": ["two"]}  # parsed as the form it says it is
    assert request["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert request["headers"]["X-Thing"] == "yes"
    assert request["headers"]["User-Agent"].startswith("kgpool/")


@pytest.mark.parametrize("given,body", [("json", {"n": 1}), ("text", "not json")])
def test_body_content_type_follows_the_body(private: Path, given: str, body: object) -> None:
    """Without -H: JSON when the body parses as JSON, else plain text (not curl's form)."""
    data = json.dumps(body) if given == "json" else str(body)
    out = call(private, str(KITCHEN), "/echo", "--data", data)  # a bare path with data: POST
    assert out.code == 0, out.stderr
    request = json.loads(out.body)
    assert request["body"] == body
    assert request["headers"]["Content-Type"] == \
        ("application/json" if given == "json" else "text/plain; charset=utf-8")


@pytest.mark.channel_independent
def test_body_from_stdin_and_from_a_file(private: Path) -> None:
    out = call(private, str(KITCHEN), "PUT /echo", "-d", "@-", stdin=b'{"from": "stdin"}')
    assert out.code == 0, out.stderr
    assert json.loads(out.body)["body"] == {"from": "stdin"}
    with tempfile.NamedTemporaryFile(suffix=".json") as source:
        source.write(b'{"from": "file"}')
        source.flush()
        out = call(private, str(KITCHEN), "PUT /echo", "-d", f"@{source.name}")
    assert out.code == 0, out.stderr
    assert json.loads(out.body)["body"] == {"from": "file"}
    assert out.left_files == []


def test_cell_that_raises_is_500_and_exit_5(private: Path) -> None:
    out = call(private, str(KITCHEN), "GET /raise")
    assert out.code == 5
    assert out.head[0] == "HTTP/1.1 500 Internal Server Error"
    assert json.loads(out.body) == {"error": "ValueError", "message": 'boom "quoted"',
                                    "reason": "Internal Server Error"}
    assert out.left_files == [] and out.left_kernels == []


def test_body_only(private: Path) -> None:
    out = call(private, str(KITCHEN), "/hello/world", "--body-only")
    assert (out.code, out.stdout) == (0, b"fixed")


@pytest.mark.parametrize("notebook,code,message", [
    ("no_endpoints.ipynb", 2, "has no endpoint"),
    ("missing.ipynb", 2, "cannot read notebook"),
    ("init_fails.ipynb", 1, "init cell 2 ('x = 1') raised ZeroDivisionError"),
])
def test_a_notebook_that_cannot_be_served(private: Path, notebook: str, code: int,
                                          message: str) -> None:
    out = call(private, str(NOTEBOOKS / notebook), "GET /never")
    assert out.code == code, out.stderr
    assert out.stdout == b""
    assert message in out.stderr
    assert out.left_files == [] and out.left_kernels == []


@pytest.mark.channel_independent
@pytest.mark.parametrize("args,message", [
    (["FETCH /x"], "'FETCH' is not an HTTP method"),
    (["x"], 'should look like "GET /path'),
    (["/x", "-H", "no colon"], "-H wants 'Name: value'"),
    (["/x", "-d", "@/no/such/file"], "-d @/no/such/file: cannot read it"),
])
def test_bad_arguments_are_clear_errors(private: Path, args: list[str], message: str) -> None:
    out = call(private, str(KITCHEN), *args)
    assert out.code == 2
    assert message in out.stderr
    assert out.left_kernels == []


def test_serve_options_apply_and_others_are_not_read(private: Path) -> None:
    """--timeout is serve's own option (504 past it); KGPOOL_KERNELS and KGPOOL_PORT, which
    mean nothing for one request, are not read (a bad one is no error)."""
    out = call(private, str(KITCHEN), "GET /sleep?s=5", "--timeout", "1",
               env={"KGPOOL_KERNELS": "many", "KGPOOL_PORT": "tcp://10.0.0.1:8888"})
    assert out.code == 5, out.stderr
    assert out.head[0] == "HTTP/1.1 504 Gateway Timeout"
    assert out.left_files == [] and out.left_kernels == []


@pytest.mark.channel_independent
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_call_and_its_kernel(private: Path, signum: int, code: int) -> None:
    meet = private / "meet"
    meet.mkdir()
    proc = start(private, str(KITCHEN), f"GET /meet?n=2&wait=6000&dir={meet}")
    try:  # the cell leaves a file there, then waits (60 s) for a second request
        wait_for(lambda: any(meet.iterdir()), 60, "the request to be running in the kernel")
    except AssertionError:
        proc.kill()
        raise
    seen = kernel_children(proc.pid)
    assert len(seen) == 1
    proc.send_signal(signum)
    out = finish(private, proc, seen=seen)
    assert out.code == code, out.stderr
    assert out.stdout == b""
    assert "kgpool call: " in out.stderr
    assert out.left_kernels == []
    assert [name for name in out.left_files if not name.startswith("meet/")] == []


@pytest.mark.channel_independent
def test_help_lists_the_call_and_serve_options() -> None:
    helptext = subprocess.run([sys.executable, "-m", "kgpool", "call", "--help"],
                              capture_output=True, text=True, timeout=30).stdout
    for text in ("--data", "--header", "--body-only", "--kernel-name", "--timeout",
                 "--channel", "--init-timeout", "exit status", "KGPOOL_TIMEOUT"):
        assert text in helptext, text
    for serve_only in ("--kernels ", "--port", "--auth-token", "--max-connections"):
        assert serve_only not in helptext, serve_only
