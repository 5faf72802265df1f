"""kgpool as a drop-in for Kernel Gateway: its command line, its notebooks, its answers.

The servers here are started as Kernel Gateway would be (`kgpool --KernelGatewayApp...`); the
expected answers are the ones Kernel Gateway 3.0.1 gives for the same requests.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import EXAMPLE, NOTEBOOKS, KGServer, Server

pytestmark = pytest.mark.timeout(120)
API = "--KernelGatewayApp.api=kernel_gateway.notebook_http"


def seed(name: str) -> str:
    return f"--KernelGatewayApp.seed_uri={NOTEBOOKS / name}"


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jupyter-config")


@pytest.fixture(scope="module")
def kg(config_dir: Path) -> Iterator[KGServer]:
    with KGServer(API, seed("kg_api.ipynb"), config_dir=config_dir) as server:
        yield server


def test_get_with_path_and_query_parameters(kg: KGServer) -> None:
    assert kg.get("/greet").body == b"hi all\n"
    assert kg.get("/greet/Carol").body == b"hi Carol\n"
    assert kg.get("/greet/who?who=Dan").body == b"hi Dan\n"
    assert kg.get("/greet/everyone?who=Dan&who=Eve").body == b"hi Dan & Eve\n"


def test_put_post_delete_change_kernel_state(kg: KGServer) -> None:
    assert kg.request("PUT", "/board", body="hello {}").status == 200
    assert kg.get("/board").body == b"hello {}\n"
    people = json.dumps(["Ann", "Bob", "Cid"])
    resp = kg.request("POST", "/guests", body=people,
                      headers={"Content-Type": "application/json"})
    assert resp.status == 200 and resp.body == people.encode() + b"\n"
    assert kg.request("DELETE", "/guests/1").body == b'["Ann", "Cid"]\n'


def test_errors_and_methods(kg: KGServer) -> None:
    assert kg.get("/broken").status == 500
    assert kg.get("/noise").body == b"out\n"  # stderr is not the body
    assert kg.request("DELETE", "/board").status == 405
    missing = kg.get("/no/such/path")
    assert missing.status == 404
    assert missing.json()["reason"] == "Not Found"  # what Kernel Gateway's clients read


def test_request_headers_reach_the_cell(kg: KGServer) -> None:
    for ctype in ("text/plain", "application/json", "application/atom+xml", "foo"):
        assert kg.get("/ctype", headers={"Content-Type": ctype}).text == f"{ctype}\n"
    quoted = '""9a28a9262f954494a8de7442c63d6d0715ce0998""'
    assert kg.get("/header/If-None-Match", headers={"If-None-Match": quoted}).text == \
        quoted + "\n"


def test_results_joined_cells_and_environment(kg: KGServer) -> None:
    assert kg.get("/sum").body == b'{"text/plain": "42"}'
    assert kg.get("/split").body == b"two cells\n"
    assert kg.get("/served").body == b"KERNEL_GATEWAY=1\n"


def test_optional_paths_are_off_by_default(kg: KGServer) -> None:
    assert kg.get("/_api/source").status == 404
    assert kg.get("/public").status == 404
    assert kg.get("/public/index.html").status == 404


def test_swagger_is_kernel_gateways(config_dir: Path) -> None:
    with KGServer(API, seed("kg_two_verbs.ipynb"), config_dir=config_dir) as server:
        ok = {"responses": {"200": {"description": "Success"}}}
        assert server.get("/_api/spec/swagger.json").json() == {
            "swagger": "2.0", "info": {"version": "0.0.0", "title": "kg_two_verbs"},
            "paths": {"/label": {"get": ok, "post": ok}}}


def test_response_info_sets_type_status_and_headers(config_dir: Path) -> None:
    with KGServer(API, seed("kg_responses.ipynb"), config_dir=config_dir) as server:
        doc = server.get("/doc")
        assert doc.status == 200 and doc.headers["Content-Type"] == "application/json"
        assert doc.json() == {"greeting": "hi"}
        empty = server.get("/empty")
        assert empty.status == 204 and empty.body == b""
        tagged = server.get("/tagged")
        assert tagged.headers["Etag"] == "v42" and tagged.json() == {"greeting": "hi"}


def test_prespawned_kernels_take_requests_in_turn(config_dir: Path) -> None:
    with KGServer(API, seed("kg_api.ipynb"), "--KernelGatewayApp.prespawn_count=3",
                  config_dir=config_dir) as server:
        assert server.request("PUT", "/board", body="changed").status == 200
        # the kernel that took the PUT comes round again only on the third GET
        assert [server.get("/board").text for _ in range(3)] == \
            ["hi {}\n", "hi {}\n", "changed\n"]
        pids = [server.get("/pid").text for _ in range(6)]
        assert len(set(pids)) == 3 and pids[:3] == pids[3:]
        with ThreadPoolExecutor(2) as ex:
            slow = ex.submit(server.get, "/wait/3")
            fast = server.get("/wait/0.1")  # another kernel: not stuck behind the slow one
            assert fast.status == 200 and not slow.done()
            assert slow.result().status == 200
        with ThreadPoolExecutor(7) as ex:  # 7 requests, 3 kernels: one request per kernel
            answers = list(ex.map(lambda _: server.get("/wait/0.3"), range(7)))
        assert {a.status for a in answers} == {200} and len({a.text for a in answers}) == 3


@pytest.mark.no_fork  # kgpool does not treat the notebook as Python: --fork refuses it
def test_forced_kernel_serves_a_notebook_of_an_unknown_language(config_dir: Path) -> None:
    with KGServer(API, seed("kg_unknown_kernel.ipynb"),
                  "--KernelGatewayApp.force_kernel_name=python3",
                  config_dir=config_dir) as server:
        assert server.get("/_api/spec/swagger.json").status == 200
        assert server.get("/say%20'not%20a%20real%20language'").text == "said\n"


def test_static_files_and_notebook_download(config_dir: Path, tmp_path: Path) -> None:
    public = tmp_path / "public"
    (public / "sub").mkdir(parents=True)
    (public / "index.html").write_text("<h1>hello</h1>")
    (public / "sub" / "data.json").write_text("{}")
    (tmp_path / "secret.txt").write_text("outside")
    with KGServer(API, seed("kg_api.ipynb"), f"--NotebookHTTPPersonality.static_path={public}",
                  "--NotebookHTTPPersonality.allow_notebook_download=True",
                  config_dir=config_dir) as server:
        page = server.get("/public/index.html")
        assert page.status == 200 and page.headers["Content-Type"] == "text/html"
        assert page.body == b"<h1>hello</h1>"
        assert server.get("/public/sub/data.json").headers["Content-Type"] == "application/json"
        assert server.get("/public/").status == 403
        assert server.get("/public/nothing.html").status == 404
        for escape in ("/public/../secret.txt", "/public/%2e%2e/secret.txt",
                       "/public/sub/%2e%2e/%2e%2e/secret.txt"):
            assert b"outside" not in server.get(escape).body
        source = server.get("/_api/source")
        assert source.status == 200
        assert source.headers["Content-Type"] == "application/octet-stream"
        assert source.body == (NOTEBOOKS / "kg_api.ipynb").read_bytes()
        assert {"cells", "metadata", "nbformat", "nbformat_minor"} <= set(source.json())


def test_the_seed_tutorial_with_kgpool_for_jupyter_kernelgateway(tmp_path: Path) -> None:
    # its config file, in the Jupyter config folder; the notebook next to where it runs
    (tmp_path / "jupyter_kernel_gateway_config.py").write_text("c.KernelGatewayApp.ip = '*'\n")
    (tmp_path / "Notebook.ipynb").write_bytes(EXAMPLE.read_bytes())
    server = KGServer("--KernelGatewayApp.api='kernel_gateway.notebook_http'",
                      "--KernelGatewayApp.seed_uri='./Notebook.ipynb'", config_dir=tmp_path)
    server.cwd = tmp_path
    with server:
        assert server.get("/convert?angle=180").text.strip() == \
            '{"convertedAngle": 3.141592653589793}'
        assert "listening on http://*:" in server.output()


def test_environment_only_deployment(tmp_path: Path) -> None:
    server = KGServer(config_dir=tmp_path, port_option=False)
    server.env.update({"KG_API": "kernel_gateway.notebook_http", "KG_SEED_URI": str(EXAMPLE),
                       "KG_PORT": str(server.port), "KG_PRESPAWN_COUNT": "2",
                       "KG_AUTH_TOKEN": "t0k", "KG_BASE_URL": "/api/"})
    server.base = "/api"
    with server:
        assert server.get("/api/convert?angle=90").status == 401
        assert server.get("/api/convert?angle=90&token=t0k").status == 200
        ready = server.get("/api/readyz").json()
        assert ready["kernels"]["idle"] == 2
        assert "auth_token='***'" in server.output() and "t0k" not in server.output()


def test_seed_uri_over_http_is_fetched_once(tmp_path: Path) -> None:
    served = tmp_path / "www"
    served.mkdir()
    (served / "remote.ipynb").write_bytes(EXAMPLE.read_bytes())
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *a, directory=str(served), **kw)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/remote.ipynb"
        with KGServer(API, f"--KernelGatewayApp.seed_uri={url}", config_dir=tmp_path) as server:
            assert server.get("/convert?angle=180").status == 200
            spec = server.get("/_api/spec/swagger.json").json()
            assert spec["info"]["title"] == "remote"
            fetched = [line for line in server.output().splitlines() if "kgpool-seed-" in line]
        assert fetched, "the log names where the notebook was saved"
        left = list(Path(tempfile.gettempdir()).glob("kgpool-seed-*"))
        assert not left, f"the downloaded notebook outlived the server: {left}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_kgpool_flags_mix_with_kernel_gateways(config_dir: Path) -> None:
    with KGServer(API, seed("kg_api.ipynb"), "--timeout", "1", "--kernels", "2",
                  config_dir=config_dir) as server:
        assert server.get("/wait/5").status == 504
        assert server.get("/readyz").json()["kernels"]["desired"] == 2


def test_options_kgpool_ignores_are_named_at_start_up(config_dir: Path) -> None:
    with KGServer(API, seed("kg_api.ipynb"), "--KernelGatewayApp.port_retries=0",
                  config_dir=config_dir) as server:
        assert "KernelGatewayApp.port_retries ignored: kgpool never moves" in server.output()
    refused = subprocess.run(
        [sys.executable, "-m", "kgpool", seed("kg_api.ipynb"),
         "--KernelGatewayApp.api=kernel_gateway.jupyter_websocket"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, "JUPYTER_CONFIG_DIR": str(config_dir)})
    assert refused.returncode == 2 and "notebook-http only" in refused.stderr


# ----- what Kernel Gateway serves, kgpool serves: near misses, readiness -------------------

def test_near_miss_cells_run_at_warm_up_with_warnings() -> None:
    with Server(NOTEBOOKS / "near_misses.ipynb") as server:
        assert server.get("/ran").json() == ["tight", "lower", "head", "blank"]
        assert server.get("/tight").status == 404
        assert server.get("/u/7").text == "by id"
        assert server.request("POST", "/u/7").status == 405  # the other spelling never runs
        assert server.get("/spaced%20path").text == "spaced"
        log = server.output()
        for cell in ("cell 2 ('#GET /tight')", "cell 3 ('# get /lower')",
                     "cell 4 ('# HEAD /head')", "cell 5 ('# GET /blank-first-line')"):
            assert cell in log and "init cell" in log
        assert "/u/:id and /u/:name" in log and "whitespace" in log and "/nowhere" in log
        index = server.get("/").text  # no token configured: the warnings quote cells
        assert "data-warnings" in index and "warning(s)" in index
        assert "#GET /tight" not in index


@pytest.mark.channel_independent  # refused before any kernel starts
def test_near_miss_cells_refused_with_strict() -> None:
    out = subprocess.run([sys.executable, "-m", "kgpool", "serve", "--strict",
                          str(NOTEBOOKS / "near_misses.ipynb")], capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 2
    assert "cell 2 ('#GET /tight')" in out.stderr and "--strict" in out.stderr


@pytest.mark.channel_independent  # no kernel
def test_routes_lists_the_warnings() -> None:
    out = subprocess.run([sys.executable, "-m", "kgpool", "routes",
                          str(NOTEBOOKS / "near_misses.ipynb")], capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 0
    assert out.stdout.count("warning: ") == 7 and "cell 2 ('#GET /tight')" in out.stdout


def first_answer(server: Server, path: str) -> int:
    """The status of `path`, sent as soon as the server listens."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return server.get(path, timeout=60).status
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def readiness(server: Server) -> list[tuple[int, int]]:
    """(status, kernels still starting) of /readyz, polled until it first says 200."""
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ready = server.get("/readyz", timeout=5)
        except OSError:  # not listening yet
            time.sleep(0.05)
            continue
        seen.append((ready.status, ready.json()["kernels"]["starting"]))
        if ready.status == 200:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"never ready: {seen[-3:]}")


def test_ready_only_when_every_kernel_is_warm(tmp_path: Path) -> None:
    server = Server(NOTEBOOKS / "staggered.ipynb", "--kernels", "3",
                    env={"KGPOOL_TEST_FLAG": str(tmp_path / "first")}).start(ready=False)
    try:
        with ThreadPoolExecutor(1) as ex:
            early = ex.submit(first_answer, server, "/pid")  # sent before any kernel is warm
            seen = readiness(server)
            assert seen[-1] == (200, 0)
            assert any(starting for _, starting in seen[:-1]), "one kernel was warm early"
            assert early.result() == 200
        # requests spread over all three kernels from the start
        assert len({server.get("/pid").text for _ in range(3)}) == 3
    finally:
        server.stop()


@pytest.mark.no_fork  # one template warms; its workers are all ready at once
def test_ready_kernels_lowers_the_bar(tmp_path: Path) -> None:
    server = Server(NOTEBOOKS / "staggered.ipynb", "--kernels", "3", "--ready-kernels", "1",
                    env={"KGPOOL_TEST_FLAG": str(tmp_path / "first")}).start(ready=False)
    try:
        status, starting = readiness(server)[-1]
        assert status == 200 and starting == 2  # serving on the first warm kernel
        assert server.get("/pid").status == 200
    finally:
        server.stop()


# ----- base_url, TLS -------------------------------------------------------------------------

def test_everything_under_base_url() -> None:
    with Server(EXAMPLE, "--base-url", "/v1/", base="/v1") as server:
        assert server.get("/v1/convert?angle=180").status == 200
        for path in ("/v1/healthz", "/v1/readyz", "/v1/metrics", "/v1/_api/spec/swagger.json",
                     "/v1/_kgpool/readyz", "/v1/"):
            assert server.get(path).status == 200, path
        for path in ("/convert", "/healthz", "/readyz", "/metrics", "/", "/v2/convert"):
            assert server.get(path).status == 404, path
        assert server.get("/v1/_api/spec/openapi.json").json()["servers"] == [{"url": "/v1"}]


def test_https_with_kernel_gateways_certificate_options(config_dir: Path,
                                                        tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=60)
    server = KGServer(API, seed("kg_api.ipynb"), f"--certfile={cert}", f"--keyfile={key}",
                      config_dir=config_dir)
    server.https = ssl.create_default_context(cafile=str(cert))
    with server:
        assert server.get("/greet").text == "hi all\n"
        plain = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        with pytest.raises((OSError, http.client.HTTPException)):
            plain.request("GET", "/greet")
            plain.getresponse().read()
        plain.close()


def test_etag_and_304_as_kernel_gateway_sends_them(kg: KGServer) -> None:
    first = kg.get("/greet")
    etag = first.headers["Etag"]
    assert etag.startswith('"') and len(etag) == 42  # a SHA-1 of the body, quoted
    again = kg.get("/greet", headers={"If-None-Match": etag})
    assert again.status == 304 and again.body == b"" and again.headers["Etag"] == etag
    assert kg.get("/greet", headers={"If-None-Match": '"other"'}).status == 200
    assert "Etag" not in kg.request("PUT", "/board", body="hi {}").headers  # GET only


def test_options_on_a_known_path_needs_no_kernel(kg: KGServer) -> None:
    resp = kg.request("OPTIONS", "/greet")
    assert resp.status == 200 and resp.body == b"" and resp.headers["Allow"] == "GET"
    assert kg.request("OPTIONS", "/nowhere").status == 404
