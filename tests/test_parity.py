"""The two channels answer alike: every endpoint of a corpus notebook, on both, same answer.

The corpus (tests/notebooks/parity.ipynb, written by make_parity_notebook.py) holds cells as
notebook authors write them. Each endpoint is called once, in notebook order, on a server with
`--channel direct` and one with `--channel jupyter` (one kernel each, so state that cells leave
behind is the same on both), with the same request; status, headers and body must be equal.
A third server runs --fork: a worker forked from a template must answer as the Jupyter channel.
KGPOOL_PARITY_NOTEBOOK=path runs another corpus the same way. A few answers are also checked
against what Jupyter and Kernel Gateway give, so that both channels cannot be wrong alike.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import NOTEBOOKS, Response, Server

from kgpool.notebook import load_notebook

# The parity suite runs both channels itself: the KGPOOL_CHANNEL=jupyter pass skips it.
pytestmark = [pytest.mark.timeout(600), pytest.mark.channel_independent]

CORPUS = Path(os.environ.get("KGPOOL_PARITY_NOTEBOOK") or NOTEBOOKS / "parity.ipynb")
REQUEST_HEADERS = {"Host": "parity.test", "X-Parity": "parity ✓".encode().decode("latin-1"),
                   "Content-Type": "application/json"}
QUERY = "?n=1&s=%C3%A9&raw=%FF&n=2"
BODY = json.dumps({"name": "körper", "items": [1, 2, 3]}).encode()
# Headers that differ per server or per response whatever the channel.
# (the Etag is the hash of the body, compared itself once addresses are normalised)
VOLATILE = {"date", "server", "x-request-id", "content-length", "etag"}
# Addresses in reprs differ between any two processes.
ADDRESS = re.compile(rb"0x[0-9a-fA-F]{6,16}")


def target(method: str, path: str) -> str:
    return re.sub(r":(\w+)", r"p-\1", path) + QUERY


def answer(resp: Response) -> tuple[int, dict[str, str], bytes]:
    headers = {k.lower(): v for k, v in resp.headers.items() if k.lower() not in VOLATILE}
    return resp.status, headers, ADDRESS.sub(b"0x?", resp.body)


@pytest.fixture(scope="module")
def answers() -> Iterator[dict[str, dict[str, tuple[int, dict[str, str], bytes]]]]:
    """{"METHOD /path": {"direct": answer, "jupyter": answer, "fork": answer}}, in notebook
    order; "fork" is a worker forked from a template (--fork, the direct channel)."""
    notebook = load_notebook(CORPUS)
    modes = {"direct": ("--channel", "direct", "--no-fork"),
             "jupyter": ("--channel", "jupyter", "--no-fork"),
             "fork": ("--channel", "direct", "--fork")}
    servers = {mode: Server(CORPUS, "--kernels", "1", "--timeout", "30", *flags)
               for mode, flags in modes.items()}
    started: list[Server] = []
    try:
        for server in servers.values():
            started.append(server.start())
        out: dict[str, dict[str, tuple[int, dict[str, str], bytes]]] = {}
        for ep in notebook.endpoints:
            body = BODY if ep.method in ("POST", "PUT", "PATCH") else None
            key = f"{ep.method} {ep.path}"
            out[key] = {channel: answer(server.request(
                ep.method, target(ep.method, ep.path), body=body,
                headers=REQUEST_HEADERS, timeout=60)) for channel, server in servers.items()}
        LOGS.update({channel: server.output() for channel, server in servers.items()})
        yield out
    finally:
        for server in started:
            server.stop()


LOGS: dict[str, str] = {}


def test_nothing_a_cell_printed_reaches_kgpools_log(
        answers: dict[str, dict[str, tuple[int, dict[str, str], bytes]]]) -> None:
    for channel, log in LOGS.items():
        for printed in ("leftover thread output", "late output", "raw fd", "from C", "hi\n",
                        "dunder stdout", "worker 0", "fd ünïcode"):
            assert printed not in log, (channel, printed)


@pytest.mark.skipif(CORPUS != NOTEBOOKS / "parity.ipynb", reason="another corpus")
def test_cells_the_direct_channel_cannot_run_alike_fall_back_and_the_log_says_why(
        answers: dict[str, dict[str, tuple[int, dict[str, str], bytes]]]) -> None:
    log = LOGS["direct"]
    assert "GET /await runs on the Jupyter channel: SyntaxError: top-level await" in log
    assert "GET /syntax-error runs on the Jupyter channel: " in log
    assert log.count("runs on the Jupyter channel") == 2
    assert answers["GET /await"]["direct"][2] == b"awaited\n"
    assert LOGS["fork"].count("runs through the shell's run_cell") == 2  # in the worker
    assert answers["GET /await"]["fork"][2] == b"awaited\n"


def test_corpus_is_large_enough(answers: dict[str, dict[str, tuple[int, dict[str, str],
                                                                   bytes]]]) -> None:
    assert len(answers) >= 60


Answers = dict[str, dict[str, tuple[int, dict[str, str], bytes]]]


def differences(answers: Answers, mode: str) -> list[str]:
    """Every endpoint whose answer in `mode` is not the Jupyter channel's, both shown."""
    differ = []
    for key, got in answers.items():
        if got[mode] != got["jupyter"]:
            (ms, mh, mb), (js, jh, jb) = got[mode], got["jupyter"]
            differ.append(f"{key}:\n  {mode:7} {ms} {mh} {mb[:300]!r}\n"
                          f"  jupyter {js} {jh} {jb[:300]!r}")
    return differ


def test_every_endpoint_answers_the_same_on_both_channels(answers: Answers) -> None:
    differ = differences(answers, "direct")
    assert not differ, f"{len(differ)} of {len(answers)} differ:\n" + "\n".join(differ)


def test_forked_workers_answer_as_the_jupyter_channel(answers: Answers) -> None:
    differ = differences(answers, "fork")
    assert not differ, f"{len(differ)} of {len(answers)} differ:\n" + "\n".join(differ)


# What a notebook user sees in Jupyter (and Kernel Gateway returns) for some of the cells.
EXPECTED = {
    "GET /os-system": (200, b"hi\n"),
    "GET /subprocess-run": (200, b"hi\n"),
    "GET /os-write": (200, b"raw fd\n"),
    "GET /order": (200, b"a\nb\nc\nd\ne\n"),
    "GET /c-puts": (200, b"from C\n"),
    "GET /semicolon": (200, b""),
    "GET /semicolon-name": (200, b""),
    "GET /semicolon-print": (200, b"still printed\n"),
    "GET /thread-next": (200, b"next request\n"),
    "GET /process-next": (200, b"after the late output\n"),
    "GET /thread-joined": (200, b"from thread\nmain\n"),
    "GET /logging": (200, b"logged to stdout\n"),
    "GET /dunder-stdout": (200, b"dunder stdout\n"),
    "GET /multiprocessing": (200, b"worker 0\nworker 1\nworker 2\n[0, 1, 4]\n"),
    "GET /shell": (200, b"hi\r\n"),
    "GET /history": (200, b"1 0\n"),  # store_history=False, and no output kept per count
}
ERRORS = {
    "GET /getpass": "StdinNotImplementedError",
    "GET /input": "StdinNotImplementedError",
    "GET /exception-group": "ExceptionGroup",
    "GET /cell-magic-below": "UsageError",
    "GET /unknown-magic": "UsageError",
    "GET /exit-code": "SystemExit",
    "GET /keyboard-interrupt": "KeyboardInterrupt",
    "GET /sigint": "KeyboardInterrupt",
    "GET /recursion": "RecursionError",
    "GET /str-fails": "RuntimeError",
    "GET /repr-fails": "ValueError",
    "GET /warning-as-error": "UserWarning",
}


@pytest.mark.skipif(CORPUS != NOTEBOOKS / "parity.ipynb", reason="another corpus")
@pytest.mark.parametrize("channel", ["direct", "jupyter", "fork"])
def test_answers_are_what_jupyter_gives(
        answers: dict[str, dict[str, tuple[int, dict[str, str], bytes]]], channel: str) -> None:
    wrong = []
    for key, (status, body) in EXPECTED.items():
        got = answers[key][channel]
        if (got[0], got[2]) != (status, body):
            wrong.append(f"{key}: {got[0]} {got[2][:200]!r}")
    for key, ename in ERRORS.items():
        got = answers[key][channel]
        if got[0] != 500 or json.loads(got[2])["error"] != ename:
            wrong.append(f"{key}: {got[0]} {got[2][:200]!r}")
    if not answers["GET /underscore"][channel][2].startswith(b"42 "):
        wrong.append(f"GET /underscore: {answers['GET /underscore'][channel]}")
    bytes_answer = answers["GET /bytes"][channel]
    if (bytes_answer[1]["content-type"], bytes_answer[2]) != ("application/octet-stream",
                                                                bytes(range(256))):
        wrong.append(f"GET /bytes: {bytes_answer}")
    assert not wrong, "\n".join(wrong)
