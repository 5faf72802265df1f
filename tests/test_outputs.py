"""The iopub fold, on recorded message contents."""

from __future__ import annotations

import pytest

from kgpool.outputs import ExecutionResult

pytestmark = [pytest.mark.timeout(30), pytest.mark.channel_independent]  # pure code


def fold(*messages: tuple[str, dict[str, object]]) -> ExecutionResult:
    result = ExecutionResult()
    for msg_type, content in messages:
        result.feed(msg_type, content)
    return result


def test_stdout_concatenated_verbatim() -> None:
    r = fold(("status", {"execution_state": "busy"}),
             ("stream", {"name": "stdout", "text": "a"}),
             ("stream", {"name": "stderr", "text": "ignored"}),
             ("stream", {"name": "stdout", "text": "b\n"}),
             ("execute_result", {"data": {"text/plain": "2"}}),
             ("status", {"execution_state": "idle"}))
    assert r.idle and not r.done  # the execute_reply is still to come
    r.reply({"status": "ok"})
    assert r.done and r.error is None
    assert r.text == "ab\n" and r.stderr == ["ignored"]


def test_execute_result_bundle_when_no_stdout() -> None:
    r = fold(("execute_result", {"data": {"text/plain": "{'a': 1}"}}))
    assert r.text == '{"text/plain": "{\'a\': 1}"}'


def test_display_data_kept_but_not_the_body() -> None:
    r = fold(("display_data", {"data": {"text/html": "<b>x</b>"}}))
    assert r.text == "" and r.displays == [{"text/html": "<b>x</b>"}]


def test_error_recorded_and_not_done_until_idle() -> None:
    r = fold(("error", {"ename": "E", "evalue": "v", "traceback": []}))
    assert r.error == {"ename": "E", "evalue": "v", "traceback": []}
    r.reply({"status": "error", "ename": "Other", "evalue": "x"})
    assert not r.done
    assert r.error["ename"] == "E"  # the iopub error message is the more precise one


@pytest.mark.parametrize("order", ["reply first", "error first"])
def test_an_error_only_in_the_reply_is_the_error(order: str) -> None:
    iopub = [("stream", {"name": "stdout", "text": "partial"}),
             ("status", {"execution_state": "idle"})]
    r = ExecutionResult()
    if order == "reply first":
        r.reply({"status": "error", "ename": "ExceptionGroup", "evalue": "eg (1 sub-exception)",
                 "traceback": []})
    for message in iopub:
        r.feed(*message)
    if order == "error first":
        r.reply({"status": "error", "ename": "UsageError", "evalue": "no magic"})
    assert r.done and r.error is not None
    assert r.error["ename"] == ("ExceptionGroup" if order == "reply first" else "UsageError")


def test_iopub_error_replaces_a_reply_error_whatever_arrives_first() -> None:
    r = ExecutionResult()
    r.reply({"status": "error", "ename": "NoneType", "evalue": "None"})
    r.feed("error", {"ename": "ValueError", "evalue": "x", "traceback": []})
    assert r.error is not None and r.error["ename"] == "ValueError"


def test_missing_or_aborted_reply_is_an_error() -> None:
    missing, aborted = ExecutionResult(), ExecutionResult()
    missing.reply(None)
    aborted.reply({"status": "aborted"})
    assert missing.error is not None and missing.error["ename"] == "KernelError"
    assert aborted.error is not None and aborted.error["ename"] == "ExecutionAborted"


def test_clear_output_drops_earlier_displays_not_stdout() -> None:
    r = fold(("stream", {"name": "stdout", "text": "kept"}),
             ("display_data", {"data": {"text/plain": "a"}}),
             ("clear_output", {"wait": False}),
             ("display_data", {"data": {"text/plain": "b"}}),
             ("clear_output", {"wait": True}))
    assert r.displays == [{"text/plain": "b"}] and r.text == "kept"
    r.feed("display_data", {"data": {"text/plain": "c"}})  # a waiting clear applies now
    assert r.displays == [{"text/plain": "c"}]
