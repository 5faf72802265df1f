"""The iopub fold, on recorded message contents."""

from __future__ import annotations

import pytest

from kgpool.outputs import ExecutionResult

pytestmark = pytest.mark.timeout(30)


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
    assert r.done and r.text == "ab\n" and r.stderr == ["ignored"]


def test_execute_result_bundle_when_no_stdout() -> None:
    r = fold(("execute_result", {"data": {"text/plain": "{'a': 1}"}}))
    assert r.text == '{"text/plain": "{\'a\': 1}"}'


def test_display_data_kept_but_not_the_body() -> None:
    r = fold(("display_data", {"data": {"text/html": "<b>x</b>"}}))
    assert r.text == "" and r.displays == [{"text/html": "<b>x</b>"}]


def test_error_recorded_and_not_done_until_idle() -> None:
    r = fold(("error", {"ename": "E", "evalue": "v", "traceback": []}))
    assert r.error == {"ename": "E", "evalue": "v", "traceback": []}
    assert not r.done
