"""A data scientist's first hour (issue 17): each mistake a new notebook makes gets a message
that names the cell (counted from 1, markdown included) and the line, in the log, in the answer
and in `kgpool routes`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import NOTEBOOKS, Server, wait_for

pytestmark = pytest.mark.timeout(120)
FIRST_HOUR = NOTEBOOKS / "first_hour.ipynb"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with Server(FIRST_HOUR, "--kernels", "1", "--expose-traceback",
                "--log-level", "debug") as srv:
        yield srv


def kgpool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kgpool", *args], capture_output=True,
                          text=True, timeout=90, stdin=subprocess.DEVNULL)


def logged(server: Server, request_id: str) -> str:
    """The cell-error record of one request: from its warning line to the next record."""
    wait_for(lambda: f"(request {request_id})" in server.output(), what="the log line")
    out = server.output()
    start = out.index(f"(request {request_id})")
    start = out.rindex("\n", 0, start) + 1
    end = re.search(r"\n\d{4}-\d\d-\d\d ", out[start:])
    return out[start:start + end.start()] if end else out[start:]


def test_a_failing_cell_is_logged_with_its_traceback(server: Server) -> None:
    resp = server.get("/deep", headers={"X-Request-ID": "deep-1"})
    assert resp.status == 500
    record = logged(server, "deep-1")
    first = record.splitlines()[0]
    assert ("WARNING kgpool.cells: GET /deep (request deep-1): cell 5 ('# GET /deep') raised "
            "ZeroDivisionError: division by zero") in first
    # the cell's own frames, as Jupyter shows them, with the notebook's line numbers
    assert "Cell 5 ('# GET /deep'), line 4" in record and "----> 4 print(f(0))" in record
    assert "Cell 5 ('# GET /deep'), line 3, in f(v)" in record
    assert "\x1b[" not in record and "skipping hidden" not in record and "kgpool" not in \
        record.split("\n", 1)[1]


def test_the_traceback_in_the_answer_has_the_cells_lines_and_no_request(server: Server) -> None:
    resp = server.request("POST", "/predict", body='{"x": "secret-value"}',
                          headers={"Content-Type": "application/json"})
    assert resp.status == 200  # "secret-value" * 2 works
    resp = server.request("POST", "/predict", body='{"y": "secret-value"}',
                          headers={"Content-Type": "application/json"})
    body = resp.json()
    assert (resp.status, body["error"], body["message"]) == (500, "KeyError", "'x'")
    text = "\n".join(body["traceback"])
    assert "Cell 3 ('# POST /predict'), line 3" in text
    assert "      1 # POST /predict\n" in text and "----> 3 x = req['body']['x']" in text
    assert "secret-value" not in text and "REQUEST =" not in text


def test_a_syntax_error_in_an_endpoint_names_its_cell_and_line(server: Server) -> None:
    assert re.search(r"WARNING kgpool: first_hour: cell 4 \('# GET /syntax'\), line 2: "
                     r"SyntaxError: '\(' was never closed; every request to GET /syntax",
                     server.output())
    assert "ready: first_hour" in server.output()  # the rest is served
    resp = server.get("/syntax", headers={"X-Request-ID": "syntax-1"})
    assert resp.status == 500
    assert resp.json()["message"] == \
        "'(' was never closed (cell 4 ('# GET /syntax'), line 2)"
    assert "cell 4 ('# GET /syntax') raised SyntaxError" in logged(server, "syntax-1")


def test_routes_warns_of_it_and_strict_refuses_it_as_serve_does() -> None:
    out = kgpool("routes", str(FIRST_HOUR))
    assert out.returncode == 0, out.stderr
    assert "warning: cell 4 ('# GET /syntax'), line 2: SyntaxError" in out.stdout
    for command in ("routes", "serve"):
        out = kgpool(command, "--strict", str(FIRST_HOUR), "--port", "0")
        assert out.returncode == 2
        assert "cell 4 ('# GET /syntax'), line 2" in out.stderr and "--strict" in out.stderr


def test_an_init_cell_that_cannot_compile_is_refused_by_routes_and_serve() -> None:
    for command in ("routes", "serve"):
        out = kgpool(command, str(NOTEBOOKS / "init_syntax.ipynb"), "--port", "0")
        assert out.returncode == 2, (command, out.stderr)
        assert "init cell 1 ('import json'), line 2: SyntaxError: '(' was never closed" \
            in out.stderr


def test_init_cell_output_is_logged_at_debug(server: Server) -> None:
    assert re.search(r"DEBUG kgpool.service: (?:slot 0|template): init cell 2 "
                     r"\('import json, linecache'\) printed:\n    init says hi", server.output())


def test_a_body_that_is_not_what_its_content_type_says_is_noted(server: Server) -> None:
    server.request("POST", "/predict", body="{bad", headers={
        "Content-Type": "application/json", "X-Request-ID": "bad-json"})
    server.request("POST", "/predict", body='{"x": 1}', headers={
        "Content-Type": "application/x-www-form-urlencoded", "X-Request-ID": "form-json"})
    out = server.output()
    assert re.search(r"POST /predict \(request bad-json\): the body is not valid JSON "
                     r"\(application/json: Expecting property name", out)
    assert "REQUEST['body'], as Kernel Gateway passes it" in out
    assert re.search(r"POST /predict \(request form-json\): the body looks like JSON but came "
                     r"as a form .*-H 'Content-Type: application/json'", out)
    wait_for(lambda: "(request form-json): cell 3" in server.output(), what="its cell error")


def test_a_kernel_does_not_cache_code_per_request(server: Server) -> None:
    """REQUEST is data, not code: the kernel compiles the same cell for every request, so
    IPython's caches of compiled cells do not grow with the requests served."""
    before = server.get("/cache").json()
    for i in range(20):
        server.request("POST", "/predict", body=json.dumps({"x": i}),
                       headers={"Content-Type": "application/json"})
    assert server.get("/cache").json() == before


def test_a_missing_kernel_spec_falls_back_to_the_environments_kernel() -> None:
    notebook = NOTEBOOKS / "other_kernelspec.ipynb"
    with Server(notebook, "--kernels", "1") as server:
        assert server.get("/ok").text == "ok"
        out = server.output()
        assert ("kernel spec 'conda-env-ds-py' is not installed here: serving it with "
                f"'python3' (the python kernel that runs {sys.executable}") in out
        assert "--kernel-name" in out
    out = kgpool("routes", str(notebook))
    assert out.returncode == 0 and "kernel python3" in out.stdout
    assert "warning: the notebook's kernel spec 'conda-env-ds-py' is not installed" \
        in out.stdout
    for command in ("routes", "serve"):  # one pinned with --kernel-name must exist
        out = kgpool(command, str(notebook), "--kernel-name", "conda-env-ds-py", "--port", "0")
        assert out.returncode == 2
        assert "no kernel spec named 'conda-env-ds-py' is installed" in out.stderr


def test_routes_takes_a_folder_as_serve_does(tmp_path: Path) -> None:
    for name in ("first_hour", "other_kernelspec"):
        (tmp_path / f"{name}.ipynb").write_bytes((NOTEBOOKS / f"{name}.ipynb").read_bytes())
    out = kgpool("routes", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "first_hour at /first_hour:" in out.stdout
    assert "other_kernelspec at /other_kernelspec:" in out.stdout
    assert re.search(r"GET\s+/other_kernelspec/ok", out.stdout)
    clash = tmp_path / "clash"
    clash.mkdir()
    for name in ("a", "b"):
        (clash / f"{name}.ipynb").write_bytes((NOTEBOOKS / "other_kernelspec.ipynb")
                                              .read_bytes())
    out = kgpool("routes", str(clash / "a.ipynb") + "=/x", str(clash / "b.ipynb") + "=/x")
    assert out.returncode == 2 and "two notebooks would be served under /x" in out.stderr


def test_a_kernel_on_another_python_gets_warnings_not_refusals(tmp_path: Path) -> None:
    """kgpool checks syntax with its own Python: for a kernel that runs another one (whose
    syntax may be newer), what fails to compile is a warning, not a refusal."""
    spec = tmp_path / "kernels" / "otherpy"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": ["/opt/other/bin/python3", "-m", "ipykernel_launcher", "-f",
                 "{connection_file}"], "display_name": "other", "language": "python"}))
    out = subprocess.run(
        [sys.executable, "-m", "kgpool", "routes", "--kernel-name", "otherpy",
         str(NOTEBOOKS / "init_syntax.ipynb")], capture_output=True, text=True, timeout=90,
        stdin=subprocess.DEVNULL, env={**os.environ, "JUPYTER_PATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "warning: init cell 1 ('import json'), line 2: kgpool's Python 3." in out.stdout
    assert "the kernel's (/opt/other/bin/python3) may" in out.stdout


def test_the_same_traceback_again_is_named_not_repeated(server: Server) -> None:
    for request_id in ("again-1", "again-2"):
        assert server.get("/deep", headers={"X-Request-ID": request_id}).status == 500
    first, second = logged(server, "again-1"), logged(server, "again-2")
    assert "ZeroDivisionError" in first and "raised ZeroDivisionError" in second
    assert len(second.splitlines()) == 1
    assert second.endswith("(the traceback logged for request deep-1)") or \
        second.endswith("(the traceback logged for request again-1)")
