"""The auth token never reaches notebook code, and unauthenticated answers never quote it.

A kernel runs as kgpool's own user (uid 10001 in the image), so the hunt runs kgpool as an
unprivileged user (uid 65534 here, through setpriv) and lets a notebook try every way it has:
environment, /proc of kgpool and of every kernel (environ, cmdline, fd/, mem, ptrace), the files
kgpool and Jupyter write, the kernel's connection file, the token file itself.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import NOTEBOOKS, ROOT, KGServer, Server

from kgpool.config import HIDDEN_ENV, ConfigError, Settings, read_token_file
from kgpool.secrets import carries_token, landlock_unavailable, visible_argv

pytestmark = pytest.mark.timeout(180)
HUNT = NOTEBOOKS / "token_hunt.ipynb"
UID = 65534
KG_API = "--KernelGatewayApp.api=kernel_gateway.notebook_http"


def new_token() -> str:
    return "kgpool-secret-" + secrets.token_hex(16)


def wait_for(predicate: Callable[[], object], timeout: float = 30.0,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Unprivileged:
    """How to run Python as a user without privileges, and a folder that user owns."""

    prefix: list[str]
    python: str
    env: dict[str, str]
    work: Path

    def command(self, *args: str) -> list[str]:
        return [*self.prefix, self.python, *args]


def _runs_kgpool(prefix: list[str], python: str, env: dict[str, str]) -> bool:
    # kgpool starts kernels with its own sys.executable: that user must be able to run it too
    code = ("import subprocess, sys, kgpool, zmq, aiohttp\n"
            "subprocess.run([sys.executable, '-c', 'import ipykernel'], check=True)")
    probe = [*prefix, python, "-c", code]
    try:
        return subprocess.run(probe, env=env, capture_output=True, timeout=60).returncode == 0
    except OSError:
        return False


@pytest.fixture(scope="module")
def nobody() -> Iterator[Unprivileged]:
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and no setpriv to drop privileges with")
        prefix = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups"]
    else:
        prefix = []  # already unprivileged
    work = Path(tempfile.mkdtemp(prefix="kgpool-secrets-test-"))
    try:
        os.chmod(work, 0o755)
        home = work / "home"
        home.mkdir()
        if prefix:
            os.chown(home, UID, UID)
        paths = sysconfig.get_paths()
        env = {**os.environ, "HOME": str(home), "PYTHONPATH": os.pathsep.join(
            [str(ROOT), paths["purelib"], paths["platlib"]])}
        for name in ("JUPYTER_RUNTIME_DIR", "JUPYTER_CONFIG_DIR", "IPYTHONDIR", "MPLCONFIGDIR",
                     "OCTAVE_HISTFILE"):  # the suite's (tests/hygiene.py): root's folders
            env.pop(name, None)
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        candidates = [sys.executable, os.path.realpath(sys.executable), f"/usr/bin/{version}",
                      f"/usr/local/bin/{version}"]
        python = next((p for p in candidates if _runs_kgpool(prefix, p, env)), None)
        if python is None:
            pytest.skip(f"no {version} interpreter that uid {UID} may run with kgpool's "
                        "dependencies on its path")
        yield Unprivileged(prefix, python, env, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def as_nobody(server: Server, nobody: Unprivileged, env: dict[str, str]) -> Server:
    server.args = nobody.command(*server.args[1:])  # the same command, unprivileged
    server.env = {**nobody.env, **env}
    return server


def secret_mount(root: Path, token: str, owner: int | None) -> Path:
    """A token file laid out as Kubernetes mounts a Secret: token -> ..data/token ->
    ..<timestamp>/token, in a folder of its own."""
    folder = root / "secrets" / "kgpool"
    stamp = folder / "..2026_01_01_00_00_00.000000000"
    stamp.mkdir(parents=True)
    (stamp / "token").write_text(token + "\n")
    (folder / "..data").symlink_to(stamp.name)
    (folder / "token").symlink_to("..data/token")
    for path in (root / "secrets", folder, stamp, stamp / "token"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    if owner is not None:
        os.chown(stamp / "token", owner, owner)  # kgpool's own, as fsGroup would make it
    return folder / "token"


def hunt(server: Server, token: str, token_file: Path | None) -> dict[str, Any]:
    query = f"?path={token_file}" if token_file else ""
    resp = server.get("/hunt" + query, headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200, resp.text
    return dict(resp.json())


# ----- the hunt itself works --------------------------------------------------------------

def test_the_hunt_finds_a_token_wherever_nothing_protects_it(nobody: Unprivileged) -> None:
    """A process of the same user that protects nothing: every probe finds its token."""
    in_env, in_argv, in_memory, in_file = (new_token() for _ in range(4))
    path = nobody.work / "victim-token"
    path.write_text(in_file)
    os.chmod(path, 0o644)
    victim = subprocess.Popen(
        nobody.command("-c", "import os, sys, time\nsecret = sys.stdin.readline()\n"
                             "held = open(sys.argv[1])\nprint('up', flush=True)\ntime.sleep(120)",
                       str(path), in_argv),
        env={**nobody.env, "KGPOOL_AUTH_TOKEN": in_env}, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE)
    try:
        assert victim.stdin is not None and victim.stdout is not None
        victim.stdin.write(in_memory.encode() + b"\n")
        victim.stdin.flush()
        assert victim.stdout.readline() == b"up\n"
        out = subprocess.run(nobody.command(str(NOTEBOOKS / "token_hunt.py"), str(victim.pid),
                                            str(path)), env=nobody.env, capture_output=True,
                             timeout=120, check=True)
        found = json.loads(out.stdout)
    finally:
        victim.kill()
        victim.wait()
        for stream in (victim.stdin, victim.stdout):
            if stream is not None:
                stream.close()
    matches = found["matches"]
    pid = victim.pid
    assert in_env in matches[f"/proc/{pid}/environ"]
    assert in_argv in matches[f"/proc/{pid}/cmdline"]
    assert {in_env, in_argv, in_memory} <= set(matches[f"/proc/{pid}/mem"])
    assert any(in_file in found for where, found in matches.items()
               if where.startswith(f"/proc/{pid}/fd/"))
    assert in_file in matches[str(path)]
    assert found["access"][f"ptrace {pid}"] == "attached"


# ----- nothing found, whichever way kgpool got the token -----------------------------------

WAYS = ["env", "flag", "flag_equals", "kg_env", "kg_flag", "file", "file_env"]


def start(way: str, token: str, nobody: Unprivileged, token_file: Path | None) -> Server:
    env: dict[str, str] = {}
    args: list[str] = []
    if way == "env":
        env["KGPOOL_AUTH_TOKEN"] = token
    elif way == "flag":
        args = ["--auth-token", token]
    elif way == "flag_equals":
        args = [f"--auth-token={token}"]
    elif way == "file":
        args = ["--auth-token-file", str(token_file)]
    elif way == "file_env":
        env["KGPOOL_AUTH_TOKEN_FILE"] = str(token_file)
    if way.startswith("kg"):
        config = nobody.work / "kg-config"
        config.mkdir(exist_ok=True)
        kg_args = [KG_API, f"--KernelGatewayApp.seed_uri={HUNT}"]
        if way == "kg_flag":
            kg_args.append(f"--KernelGatewayApp.auth_token={token}")
        else:
            env["KG_AUTH_TOKEN"] = token
        env["JUPYTER_CONFIG_DIR"] = str(config)
        server: Server = KGServer(*kg_args, config_dir=config, env=env)
    else:
        server = Server(HUNT, *args, env=env)
    return as_nobody(server, nobody, env)


@pytest.mark.parametrize("way", WAYS)
def test_no_kernel_finds_the_token(way: str, nobody: Unprivileged) -> None:
    if way.startswith("file") and landlock_unavailable():
        pytest.skip(f"cannot seal a token file here: {landlock_unavailable()}")
    token = new_token()
    token_file = secret_mount(nobody.work / way, token, UID if nobody.prefix else None) \
        if way.startswith("file") else None
    with start(way, token, nobody, token_file) as server:
        assert server.proc is not None
        found = hunt(server, token, token_file)
        pid = found["server"]
        assert pid == server.proc.pid  # the hunt looked at kgpool itself
        everything = {t for ts in found["matches"].values() for t in ts}
        assert token not in everything, {w: t for w, t in found["matches"].items()
                                         if token in t}
        access = found["access"]
        assert access[f"/proc/{pid}/cmdline"] == "read"  # readable, and without the token
        for refused in (f"/proc/{pid}/environ", f"/proc/{pid}/mem", f"/proc/{pid}/fd"):
            assert access[refused] == "PermissionError", (refused, access[refused])
        assert access[f"ptrace {pid}"] == "Operation not permitted"
        if token_file is not None:
            assert access[str(token_file)] == "PermissionError"
            assert "sealed" in server.output()
            # its folder is under /tmp: the kernels got a private TMPDIR, and a warning says so
            assert "files created after start-up directly in /tmp" in server.output()
            # (each kernel's own TMPDIR lies inside that private one)
            assert found["tmpdir"] and any(part.startswith("kgpool-tmp-")
                                           for part in found["tmpdir"].split(os.sep))
        assert not set(found["environ"]) & HIDDEN_ENV
        assert access[found["connection_file"]] == "read"  # its own connection file
        assert server.get("/hunt").status == 401  # the token is still required
        assert token not in server.output()
    if token_file is not None:
        assert not os.path.exists(found["tmpdir"])  # removed when kgpool stopped


# ----- unauthenticated answers do not quote the notebook ------------------------------------

def break_init(server: Server, flag: Path) -> None:
    """The next warm-up fails (its init cell raises with a 'secret' in the message)."""
    flag.write_text("x")
    os.kill(server.kernel_pids()[0], signal.SIGKILL)
    wait_for(lambda: server.get("/readyz").json()["failing"], what="a failed warm-up")


def test_warm_up_errors_only_behind_the_token(tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    token = "t0ken"
    with Server(NOTEBOOKS / "init_leaks.ipynb", "--kernels", "1",
                env={"KGPOOL_TEST_FLAG": str(flag), "KGPOOL_AUTH_TOKEN": token}) as server:
        break_init(server, flag)
        bare = server.get("/readyz")
        assert bare.status == 503
        assert "hunter2" not in bare.text and "RuntimeError" not in bare.text
        assert bare.json()["failing"] == ["slot 0: warm-up failed; the server log has the reason"]
        authed = server.get("/readyz", headers={"Authorization": f"Bearer {token}"})
        assert "hunter2" in " ".join(authed.json()["failing"])
        assert "hunter2" in server.get(f"/readyz?token={token}").text
        resp = server.get("/ok", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 503 and resp.json()["error"] == "not_ready"
        assert "hunter2" in resp.json()["message"]  # the caller holds the token
        assert server.get("/ok").status == 401
        assert "hunter2" in server.output()


def test_without_a_token_warm_up_errors_go_to_the_log_only(tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    with Server(NOTEBOOKS / "init_leaks.ipynb", "--kernels", "1",
                env={"KGPOOL_TEST_FLAG": str(flag)}) as server:
        break_init(server, flag)
        ready = server.get("/readyz")
        assert "hunter2" not in ready.text and "RuntimeError" not in ready.text
        resp = server.get("/ok")
        assert resp.status == 503
        body = resp.json()
        assert body["error"] == "not_ready" and set(body) == {"error", "message", "reason"}
        assert "hunter2" not in resp.text and "server log" in body["message"]
        assert "hunter2" in server.output()


def notebook(path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "python3",
                                  "language": "python"}}
    nb.cells = [nbformat.v4.new_code_cell(cell) for cell in cells]
    nbformat.write(nb, path)
    return path


def test_refused_reload_reason_only_behind_the_token(tmp_path: Path) -> None:
    path = notebook(tmp_path / "live.ipynb", "X = 1", "# GET /x\nprint(X)")
    token = {"Authorization": "Bearer t0ken"}
    with Server(path, env={"KGPOOL_AUTH_TOKEN": "t0ken"}) as server:
        notebook(path, "raise ValueError('api key sk-live-42')", "# GET /x\nprint(X)")
        wait_for(lambda: server.get("/readyz").json()["notebooks"]["live"]["reload_error"],
                 timeout=60, what="the reload to be refused")
        bare = server.get("/readyz").json()["notebooks"]["live"]["reload_error"]
        assert "sk-live-42" not in bare and "ValueError" not in bare
        authed = server.get("/readyz", headers=token).json()["notebooks"]["live"]
        assert "sk-live-42" in authed["reload_error"]


def test_index_shows_cell_warnings_only_behind_the_token() -> None:
    near = NOTEBOOKS / "near_misses.ipynb"
    with Server(near) as open_server:
        page = open_server.get("/").text
        assert "#GET /tight" not in page and "warning(s)" in page
    with Server(near, env={"KGPOOL_AUTH_TOKEN": "t0ken"}) as guarded:
        assert guarded.get("/").status == 401
        page = guarded.get("/", headers={"Authorization": "Bearer t0ken"}).text
        assert "#GET /tight" in page


# ----- the token file and the command line -------------------------------------------------

def test_token_file_is_read_once_without_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"s3cret\r\n")
    assert read_token_file(str(path)) == "s3cret"
    assert Settings(notebooks=("x",), auth_token_file=str(path)).auth_token == "s3cret"
    path.write_bytes(b"s3cret")
    assert read_token_file(str(path)) == "s3cret"


@pytest.mark.parametrize("content,complaint", [
    (b"", "empty"), (b"\n", "empty"), (b"two\nlines\n", "one line"), (b" padded", "whitespace"),
    (b"\xff\xfe", "UTF-8"), (b"x" * 70000, "larger")])
def test_bad_token_files_are_refused_clearly(tmp_path: Path, content: bytes,
                                             complaint: str) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=complaint):
        read_token_file(str(path))


def test_token_file_errors_stop_the_cli(tmp_path: Path) -> None:
    def serve(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kgpool", "serve", str(HUNT), *args],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env}, stdin=subprocess.DEVNULL)

    missing = serve("--auth-token-file", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "cannot read it" in missing.stderr
    (tmp_path / "empty").write_text("")
    empty = serve(KGPOOL_AUTH_TOKEN_FILE=str(tmp_path / "empty"))
    assert empty.returncode == 2 and "empty" in empty.stderr
    (tmp_path / "token").write_text("abc\n")
    both = serve("--auth-token-file", str(tmp_path / "token"), KGPOOL_AUTH_TOKEN="abc")
    assert both.returncode == 2 and "one way" in both.stderr
    assert "abc" not in both.stderr


def test_token_arguments_are_masked_and_recognised() -> None:
    argv = ["serve", "nb.ipynb", "--auth-token", "T1", "--auth-token=T2", "--au", "T3",
            "--KernelGatewayApp.auth_token=T4", "--auth-token-file", "/run/t"]
    shown = visible_argv(argv)
    assert not {"T1", "T2", "T3", "T4"} & {part for arg in shown for part in arg.split("=")}
    assert shown[-2:] == ["--auth-token-file", "/run/t"] and shown[:2] == ["serve", "nb.ipynb"]
    assert carries_token(["serve", "--auth-token=x"], {})
    assert carries_token(["serve"], {"KG_AUTH_TOKEN": "x"})
    assert not carries_token(["serve", "--auth-token-file", "/run/t"], {"KGPOOL_AUTH_TOKEN": ""})
