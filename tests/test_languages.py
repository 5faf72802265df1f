"""Kernels of other languages, for real: bash, R, Octave, JavaScript (issue 13).

One server per language, shared by the module's tests (R and Octave start slowly); each runs
the notebook tests/notebooks/lang_<language>.ipynb, written as for Kernel Gateway. Expected
answers are Kernel Gateway 3.0.1's where it is right (README lists where kgpool differs).
A language whose kernel is not installed is skipped, except in CI, where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from conftest import NOTEBOOKS, Server, alive, wait_for, wait_gone, write_atomically
from jupyter_client.kernelspec import KernelSpecManager
from test_resilience import metric

from kgpool.errors import ConfigError
from kgpool.languages import (
    bind_request,
    comment_prefixes,
    kernel_language,
    language,
    octave_string,
    printable_json,
    read_report,
)

# --channel is about Python kernels (the direct channel is Python's): these kernels are always
# served on the Jupyter channel, and the Python tests here choose their channel themselves, so
# the KGPOOL_CHANNEL=jupyter pass of tests/run.sh skips the module.
pytestmark = [pytest.mark.timeout(180), pytest.mark.channel_independent]
TIMEOUT = 4  # the shared servers' --timeout: /sleep?s=60 runs into it


@dataclass(frozen=True)
class Lang:
    name: str
    kernel: str  # kernel spec name, as the notebook's metadata says
    program: str  # what the kernel runs on
    transport: str  # what --transport auto picks
    error: tuple[str, str]  # GET /raise -> 500 {"error", "message"}
    nl: str = ""  # bash_kernel ends every output with a newline (Kernel Gateway's too)
    reload: tuple[str, str] = ("", "")  # an init cell setting VERSION (format), an endpoint

    def missing(self) -> str | None:
        if self.kernel not in KernelSpecManager().find_kernel_specs():
            return f"no kernel spec {self.kernel!r}"
        if shutil.which(self.program) is None:
            return f"no {self.program} on PATH"
        return None


LANGS = [
    Lang("bash", "bash", "bash", "ipc",
         ("ExitStatus", "the cell's last command exited with status 2"), nl="\n",
         reload=("VERSION={}", "# GET /v\nprintf '%s' \"$VERSION\"")),
    Lang("r", "ir", "R", "ipc", ("ERROR", 'boom "quoted"'),
         reload=("VERSION <- {}", "# GET /v\ncat(VERSION)")),
    Lang("octave", "octave", "octave-cli", "ipc", ("error", 'boom "quoted"'),
         reload=("VERSION = {};", "# GET /v\nprintf('%d', VERSION)")),
    Lang("javascript", "javascript", "node", "tcp", ("Error", 'boom "quoted"'),
         reload=("var VERSION = {};", "// GET /v\nprocess.stdout.write(String(VERSION));")),
]
BY_NAME = {lang.name: lang for lang in LANGS}
# R prints é as <U+00E9> without a UTF-8 locale (under Kernel Gateway too): the servers get one
UTF8 = {} if os.environ.get("LC_ALL") else {"LANG": "C.UTF-8"}


def require(lang: Lang) -> None:
    why = lang.missing()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{lang.name} kernel unavailable in CI ({why}); tests/run.sh installs it")
    pytest.skip(f"{lang.name} kernel unavailable ({why}); tests/run.sh installs it")


def descendants(pid: int) -> set[int]:
    """Every live process a kgpool server started (jupyter_client marks the kernels'
    environment, and their own children inherit it): kernels and what runs under them."""
    found = set()
    marker = f"JPY_PARENT_PID={pid}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.add(int(entry.name))
            except OSError:
                continue
    return {p for p in found if alive(p)}


def kernels_of(pid: int) -> set[int]:
    """The server's direct children: the kernel processes."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and alive(int(entry.name)):
                found.add(int(entry.name))
    return found


def transport_of(kernel: int) -> str:
    """The transport in the connection file named on a kernel's command line."""
    argv = Path(f"/proc/{kernel}/cmdline").read_bytes().split(b"\0")
    path = next(a.decode() for a in argv if a.endswith(b".json"))
    return str(json.loads(Path(path).read_text())["transport"])


def tmpdir_of(kernel: int) -> str:
    env = Path(f"/proc/{kernel}/environ").read_bytes().split(b"\0")
    tmpdir = next(v[7:].decode() for v in env if v.startswith(b"TMPDIR="))
    assert "/kgpool-" in tmpdir
    return tmpdir


class LangServer(Server):
    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        """Server.stop, and nothing that ran under the kernels (octave-cli, bash, node) may
        outlive it either."""
        assert self.proc is not None
        everything = descendants(self.proc.pid)
        code = super().stop(sig, timeout)
        left = wait_gone(sorted(everything))
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes outlived the server: {left}"
        return code


@pytest.fixture(scope="module", params=LANGS, ids=[lang.name for lang in LANGS])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[Lang, LangServer]]:
    lang: Lang = request.param
    require(lang)
    server = LangServer(NOTEBOOKS / f"lang_{lang.name}.ipynb", "--kernels", "2",
                        "--timeout", str(TIMEOUT), env=UTF8)
    with server:
        yield lang, server


def wait_warm(server: Server, kernels: int = 2) -> None:
    def warm() -> bool:
        status = server.get("/readyz").json()["kernels"]
        return bool(status["idle"] + status["busy"] == kernels and status["starting"] == 0)
    wait_for(warm, 60, "the pool to be warm again")


# ----- the notebook written for Kernel Gateway --------------------------------------------------

def test_routes_and_path_parameters(served: tuple[Lang, LangServer]) -> None:
    lang, server = served
    for _ in range(3):  # JavaScript: a `const` in the cell works on every request
        assert server.get("/hello/bob").text == "hello bob" + lang.nl
    assert server.get("/hello/b%C3%A9b%20x").text == "hello béb x" + lang.nl
    assert server.get("/hello/world").text == "fixed" + lang.nl  # fixed path wins
    assert json.loads(server.get("/users/1/files/2").body) == {"uid": "1", "fid": "2"}
    assert server.get("/joined").text == "first+second" + lang.nl
    assert server.request("DELETE", "/items/x%20y").text == "deleted x y" + lang.nl
    assert server.get("/state").text == "1" + lang.nl  # each kernel ran the init cells once
    assert server.get("/nope").status == 404
    assert server.request("POST", "/hello/world", body=b"").status == 405


def echo(server: Server, lang: Lang, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> dict[str, object]:
    """REQUEST as the kernel printed it, checked to be exactly kgpool's JSON text."""
    resp = server.request(method, path, body=body, headers=headers)
    assert resp.status == 200, resp.body[:300]
    assert resp.text.endswith(lang.nl)
    text = resp.text[:len(resp.text) - len(lang.nl)]
    document = json.loads(text)
    assert json.dumps(document) == text  # not re-encoded on the way: the very same text
    return dict(document)


def test_bodies_query_and_headers(served: tuple[Lang, LangServer]) -> None:
    lang, server = served
    doc = echo(server, lang, "GET", "/echo?a=1&a=2&b=", headers={"X-Test": "v"})
    assert list(doc) == ["body", "args", "path", "headers"]
    assert doc["args"] == {"a": ["1", "2"], "b": [""]} and doc["body"] == ""
    assert doc["headers"]["X-Test"] == "v"  # type: ignore[index]
    sent = {"x": [1, "two", None], "y": {"z": 1.5}}
    doc = echo(server, lang, "POST", "/echo", json.dumps(sent).encode(),
               {"Content-Type": "application/json"})
    assert doc["body"] == sent
    doc = echo(server, lang, "POST", "/echo", b"a=1&a=2&b=%20x",
               {"Content-Type": "application/x-www-form-urlencoded"})
    assert doc["body"] == {"a": ["1", "2"], "b": [" x"]}
    doc = echo(server, lang, "PUT", "/echo", b"plain text", {"Content-Type": "text/plain"})
    assert doc["body"] == "plain text"


def test_response_info(served: tuple[Lang, LangServer]) -> None:
    _, server = served
    resp = server.request("POST", "/created", body=b"")
    assert resp.status == 201
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.headers["X-Hits"] == str(resp.json()["hits"])
    bad = server.get("/badinfo")
    assert bad.status == 500 and bad.json()["error"] == "bad_response_info"


def test_error_is_a_500_with_the_kernels_error(served: tuple[Lang, LangServer]) -> None:
    lang, server = served
    resp = server.get("/raise")
    assert resp.status == 500
    assert resp.json() == {"error": lang.error[0], "message": lang.error[1],
                           "reason": "Internal Server Error"}
    assert b"lost output" not in resp.body
    assert server.get("/state").status == 200  # the kernel goes on serving


def test_binding_never_reaches_the_body(served: tuple[Lang, LangServer]) -> None:
    lang, server = served
    for _ in range(2):
        assert server.get("/nothing").body == b""
    if lang.name == "octave":  # Octave echoes an assignment without `;`, as it should
        assert server.get("/echoed").body == b"shown = 42\r\n"
        assert server.get("/percent").text == "percent"  # Octave's own comment syntax
    if lang.name == "javascript":  # the value of the cell, as Kernel Gateway answers it
        assert server.get("/result").json() == {"text/plain": "2"}


def adversarial(canary: Path) -> list[str]:
    """Values that would create the canary file if any kernel ran them as code."""
    c = str(canary)
    return [
        f"$(touch {c})", f"`touch {c}`", f"'; touch {c}; '", f"\"; touch {c}; \"",
        f"'\\''; touch {c} #", f"#{{File.write('{c}', 'x')}}", f"${{touch {c}}}", "!! !-1 !#",
        f"\"); file.create(\"{c}\"); (\"", f"'); file.create('{c}'); ('",
        f"'); system('touch {c}'); %", f"''); system(''touch {c}''); %",
        f"\"); require('fs').writeFileSync('{c}', 'x'); //",
        f"${{require('fs').writeFileSync('{c}', 'x')}}", f"`; require('fs').writeFileSync('{c}')`",
        f"'); open('{c}', 'w'); ('", "\\", "\\\\'", "\\\"", "\\u0041\\n", "\"\"\"'''",
        "\x00nul\x00", "\x7f\x08\x15\x17\x03\x04", "line\nbreak\r\nand\rreturn\t",
        "%s %d %% %{", "é ü 😀 \u2028 \ufeff", "]; [ } { ) (",
    ]


def test_adversarial_values_round_trip_and_run_nothing(served: tuple[Lang, LangServer],
                                                       tmp_path: Path) -> None:
    lang, server = served
    canary = tmp_path / "ran"
    values = adversarial(canary)
    values.append(("".join(values) * 200)[:200_000])  # a 200 KB value
    for value in values:
        doc = echo(server, lang, "POST", "/echo", value.encode(), {"Content-Type": "text/plain"})
        assert doc["body"] == value
        doc = echo(server, lang, "POST", "/echo", json.dumps({"v": value}).encode(),
                   {"Content-Type": "application/json"})
        assert doc["body"] == {"v": value}
        if len(value) < 2000 and value in values[:6]:  # the binding sees the same JSON text
            doc = echo(server, lang, "GET", "/echo?v=" + urllib.parse.quote(value))
            assert doc["args"] == {"v": [value]}
            printable = "".join(ch for ch in value if " " <= ch <= "~")
            doc = echo(server, lang, "GET", "/echo", headers={"X-Nasty": printable})
            assert doc["headers"]["X-Nasty"] == printable.strip()  # type: ignore[index]
    doc = echo(server, lang, "POST", "/echo", b"\xff\xfe raw", {"Content-Type": "text/plain"})
    assert doc["body"] == "\udcff\udcfe raw"  # not UTF-8: surrogate escapes, as for Python
    name = "a'b\"c $(x) `y` #{z} %d é"
    resp = server.get("/hello/" + urllib.parse.quote(name, safe=""))
    assert resp.text == "hello " + name + lang.nl
    assert not canary.exists(), "a request value ran as code"


def test_timeout_is_a_504_and_the_kernel_is_replaced(served: tuple[Lang, LangServer]) -> None:
    lang, server = served
    wait_warm(server)
    assert server.proc is not None
    before, under = kernels_of(server.proc.pid), descendants(server.proc.pid)
    restarts = metric(server, "kgpool_kernel_restarts_total", 'reason="timeout"')
    started = time.monotonic()
    resp = server.get("/sleep?s=60")
    assert resp.status == 504 and resp.json()["error"] == "timeout"
    assert time.monotonic() - started < TIMEOUT + 10
    wait_warm(server)

    def replaced() -> bool:  # the old kernel stops in the background, after its stack dump
        now = kernels_of(server.proc.pid)  # type: ignore[union-attr]
        return len(now - before) == 1 and len(before - now) == 1  # one replaced, one kept
    wait_for(replaced, timeout=30, what="the old kernel to be stopped and replaced")
    after = kernels_of(server.proc.pid)
    assert metric(server, "kgpool_kernel_restarts_total", 'reason="timeout"') == restarts + 1
    gone = under - descendants(server.proc.pid)
    assert gone and not wait_gone(sorted(gone))  # nothing of the old kernel is left running
    assert server.get("/sleep?s=0").text.strip() in {str(p) for p in after}


def test_crash_is_a_502_and_the_kernel_is_replaced(served: tuple[Lang, LangServer]) -> None:
    lang, server = served
    wait_warm(server)
    assert server.proc is not None
    before, under = kernels_of(server.proc.pid), descendants(server.proc.pid)
    tmpdirs = {tmpdir_of(k) for k in before}
    crashes = metric(server, "kgpool_kernel_restarts_total", 'reason="crash"')
    resp = server.get("/exit")
    assert resp.status == 502 and resp.json()["error"] == "kernel_died"
    wait_warm(server)

    def replaced() -> bool:  # the dead kernel's processes are stopped in the background
        now = kernels_of(server.proc.pid)  # type: ignore[union-attr]
        return len(now - before) == 1 and len(before - now) == 1
    wait_for(replaced, timeout=30, what="the dead kernel to be replaced")
    assert metric(server, "kgpool_kernel_restarts_total", 'reason="crash"') == crashes + 1
    assert not wait_gone(sorted(under - descendants(server.proc.pid)))
    assert server.get("/state").text == "1" + lang.nl  # the replacement ran the init cells
    # each kernel had a private TMPDIR (R, Octave and JavaScript make temp folders); the
    # killed kernel's is gone, not left in /tmp
    assert [os.path.isdir(d) for d in sorted(tmpdirs)].count(False) == 1
    # a killed octave_kernel's Octave gets SIGHUP, and would dump its workspace into the
    # notebook's folder (a clean shutdown of any later kernel deletes it again)
    assert not (NOTEBOOKS / "octave-workspace").exists()
    if lang.name == "octave":  # Octave exits, octave_kernel lives on but is of no more use
        resp = server.get("/quit")
        assert resp.status == 502 and resp.json()["error"] == "kernel_died"
        wait_warm(server)
        assert server.get("/state").text == "1"
        assert metric(server, "kgpool_kernel_restarts_total", 'reason="crash"') == crashes + 2


def test_pages_specs_metrics_and_transport(served: tuple[Lang, LangServer]) -> None:
    lang, server = served
    index = server.get("/")
    assert index.status == 200 and "/hello/:name" in index.text
    assert "/hello/{name}" in server.get("/_api/spec/openapi.json").json()["paths"]
    assert "/hello/:name" in server.get("/_api/spec/swagger.json").json()["paths"]
    server.get("/hello/metrics")
    assert metric(server, "kgpool_http_requests_total", 'route="/hello/:name",code="200"') >= 1
    assert server.proc is not None
    for kernel in kernels_of(server.proc.pid):
        assert transport_of(kernel) == lang.transport


def write_notebook(path: Path, lang: Lang, version: int) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": lang.kernel, "display_name": lang.name,
                                  "language": lang.name},
                   "language_info": {"name": lang.name}}
    nb.cells = [nbformat.v4.new_code_cell(lang.reload[0].format(version)),
                nbformat.v4.new_code_cell(lang.reload[1])]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"c{i}"
    write_atomically(path, nb)


@pytest.mark.parametrize("lang", LANGS, ids=[lang.name for lang in LANGS])
def test_live_reload(lang: Lang, tmp_path: Path) -> None:
    require(lang)
    path = tmp_path / "live.ipynb"
    write_notebook(path, lang, 1)
    with LangServer(path, "--kernels", "1") as server:
        assert server.get("/v").text == "1" + lang.nl
        write_notebook(path, lang, 2)
        wait_for(lambda: server.get("/v").text == "2" + lang.nl, 90, "the new version")


def test_javascript_with_kernel_gateways_default_comment_syntax() -> None:
    # Kernel Gateway reads `# GET /x` in a JavaScript notebook unless configured otherwise,
    # then answers every request with a SyntaxError; kgpool sends those lines as comments
    lang = BY_NAME["javascript"]
    require(lang)
    with LangServer(NOTEBOOKS / "lang_javascript_hash.ipynb") as server:
        for _ in range(2):
            assert server.get("/hash/bob").text == "hi bob"
        resp = server.request("POST", "/hash", body=b'{"a": 1}',
                              headers={"Content-Type": "application/json"})
        assert resp.status == 202 and resp.json() == {"a": 1}


# ----- which kernel, which language, which transport ---------------------------------------

@pytest.mark.parametrize("channel", ["direct", "jupyter"])
def test_unknown_notebook_language_served_by_forced_python3(channel: str) -> None:
    # Kernel Gateway's own test: metadata says fakelang / fakelang2000; the kernel started is
    # python3, so REQUEST, the direct channel and the set-up are Python's; `#` is the default.
    with Server(NOTEBOOKS / "fakelang.ipynb", "--kernel-name", "python3",
                "--channel", channel) as server:
        assert server.get("/hello?name=ann").text == "hello ann"
        # Kernel Gateway starts with a path that has spaces (the code after it on its line);
        # so does kgpool, with a warning
        assert "/py2print 'I am Python 2'" in server.get("/_api/spec/swagger.json").json()[
            "paths"]
        assert "contains whitespace" in server.output()


def test_missing_kernel_spec_is_a_clear_start_error() -> None:
    server = Server(NOTEBOOKS / "fakelang.ipynb")
    server.start(ready=False)
    assert server.proc is not None and server.proc.wait(60) == 2
    assert "no kernel spec named 'fakelang2000' is installed" in server.output()
    assert "--kernel-name" in server.output()
    server.stop()


def fake_spec(root: Path, language: str) -> dict[str, str]:
    """A kernel spec "fake" that declares `language` but starts ipykernel; the environment
    that makes the server see it."""
    spec = root / "kernels" / "fake"
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fake", "language": language}))
    return {"JUPYTER_PATH": str(root)}


def test_unverified_language_refused_unless_allowed(tmp_path: Path) -> None:
    env = fake_spec(tmp_path, "ruby")
    refused = Server(NOTEBOOKS / "fakelang.ipynb", "--kernel-name", "fake", env=env)
    refused.start(ready=False)
    assert refused.proc is not None and refused.proc.wait(60) == 2
    assert "runs ruby, for which kgpool has no REQUEST binding" in refused.output()
    refused.stop()
    # Ruby's binding is a '...' literal, which ipykernel reads the same way
    with Server(NOTEBOOKS / "fakelang.ipynb", "--kernel-name", "fake",
                "--allow-unverified-language", env=env) as server:
        assert server.get("/hello?name=%23%7Bx%7D%27%5C").text == "hello #{x}'\\"
        assert "no kgpool test has proven inert" in server.output()


def test_forced_ipc_fails_fast_and_clean_for_a_tcp_only_kernel() -> None:
    lang = BY_NAME["javascript"]
    require(lang)
    server = LangServer(NOTEBOOKS / "lang_javascript.ipynb", "--transport", "ipc")
    server.start(ready=False)
    assert server.proc is not None and server.proc.wait(60) == 1
    assert "kernel died" in server.output()
    server.stop()


@pytest.mark.parametrize("channel", ["direct", "jupyter"])
def test_forced_tcp_for_python(channel: str) -> None:
    with Server(NOTEBOOKS / "fakelang.ipynb", "--kernel-name", "python3",
                "--transport", "tcp", "--channel", channel) as server:
        assert server.get("/hello?name=tcp").text == "hello tcp"
        assert server.proc is not None
        assert {transport_of(k) for k in kernels_of(server.proc.pid)} == {"tcp"}


# ----- the table, as plain data ----------------------------------------------------------------

def test_comment_syntaxes() -> None:
    assert comment_prefixes("octave") == ("#", "%")  # Kernel Gateway's # and Octave's own %
    assert comment_prefixes("javascript") == ("//", "#")  # `#`: Kernel Gateway's default
    assert comment_prefixes("R") == ("#",) and comment_prefixes("fakelang") == ("#",)


def test_unverified_languages_need_the_option() -> None:
    with pytest.raises(ConfigError, match="--allow-unverified-language"):
        kernel_language("ruby", "iruby", allow_unverified=False)
    assert not kernel_language("ruby", "iruby", allow_unverified=True).verified
    assert kernel_language("R", "ir", allow_unverified=False).name == "r"


def octave_value(expression: str) -> str:
    """Evaluate octave_string's output: [ 'text' char(n) ... ] with ... line continuations."""
    assert expression.startswith("[") and expression.endswith("]")
    body, out, i = expression[1:-1].replace(" ...\n", " "), [], 0
    while i < len(body):
        if body[i] == " ":
            i += 1
        elif body[i] == "'":
            j = i + 1
            while not (body[j] == "'" and body[j + 1:j + 2] != "'"):
                j += 2 if body[j] == "'" else 1
            out.append(body[i + 1:j].replace("''", "'"))
            i = j + 1
        else:
            end = body.index(")", i)
            assert body[i:i + 5] == "char("
            out.append(chr(int(body[i + 5:end])))
            i = end + 1
    return "".join(out)


@pytest.mark.parametrize("text", ["", "'", "''", "a'b", "x" * 5000, "é'" * 3000,
                                  "a\nb\x7f\x00'", "😀" * 2000])
def test_octave_strings_are_exact_and_fit_a_terminal_line(text: str) -> None:
    expression = octave_string(text)
    assert octave_value(expression) == text
    assert max(len(line.encode()) for line in expression.split("\n")) < 4095
    assert all(" " <= ch or ch == "\n" for ch in expression)


def test_printable_json_keeps_the_meaning() -> None:
    raw = '{"a": "\x7f\x00é😀"}'
    text = printable_json(raw)
    assert json.loads(text) == json.loads(raw, strict=False)
    assert all(" " <= ch <= "~" for ch in text)


def test_bindings_of_interpolating_languages_are_escaped() -> None:
    request = json.dumps({"body": "#{x} $(y) ${z} $w '\\ \"q\""})
    ruby = bind_request("ruby", request)  # '...': only \\ and \' are escapes
    literal = ruby.removeprefix("REQUEST = '").removesuffix("'\n")
    assert "'" not in literal.replace("\\'", "")
    assert literal.replace("\\\\", "\0").replace("\\'", "'").replace("\0", "\\") == request
    julia = bind_request("julia", request)  # "...": every $ escaped
    assert all(julia[i - 1] == "\\" for i, ch in enumerate(julia) if ch == "$")
    assert json.loads(julia.removeprefix("REQUEST = ").replace("\\$", "$")) == request
    assert language("kotlin").bind == language("julia").bind


def test_guarded_report() -> None:
    marker = "kgpool-error-abc:"
    failed = "partial\n" + marker + json.dumps({"ename": "", "evalue": "boom"}) + "\n"
    assert read_report(failed, marker) == (
        "partial\n", {"ename": "", "evalue": "boom", "traceback": ["boom"]})
    assert read_report("no newline" + marker + "{}\r\n", marker) == ("no newline", None)
    assert read_report("the runtime went away", marker) is None
    assert language("octave").error("", "boom") == ("error", "boom")
