"""The lean Jupyter wire codec, checked against jupyter_client's own Session."""

from __future__ import annotations

import pytest
from jupyter_client.session import Session

from kgpool.wire import DELIM, Wire

pytestmark = [pytest.mark.timeout(30), pytest.mark.channel_independent]  # pure code
KEY = b"secret-key"


def test_request_is_what_session_accepts() -> None:
    wire = Wire(KEY, "sess", "me")
    msg_id, frames = wire.request("execute_request", {"code": "print('ü')"})
    msg = Session(key=KEY).deserialize(frames[frames.index(DELIM) + 1:])
    assert msg["header"]["msg_id"] == msg_id
    assert msg["header"]["msg_type"] == "execute_request"
    assert msg["content"] == {"code": "print('ü')"}


def reply(session: Session, parent_id: str, msg_type: str, content: dict[str, object]) -> \
        list[bytes]:
    msg = session.msg(msg_type, content, parent={"msg_id": parent_id, "msg_type": "x"})
    return [b"topic", *session.serialize(msg)]


def test_reply_to_matches_parent_and_checks_signature() -> None:
    wire = Wire(KEY, "sess", "me")
    frames = reply(Session(key=KEY), "abc123", "stream", {"name": "stdout", "text": "hi"})
    assert wire.reply_to(frames, b"abc123") == ("stream", {"name": "stdout", "text": "hi"})
    assert wire.reply_to(frames, b"other") is None
    forged = reply(Session(key=b"wrong"), "abc123", "stream", {"name": "stdout", "text": "x"})
    assert wire.reply_to(forged, b"abc123") is None
    assert wire.reply_to([b"no delimiter"], b"abc123") is None
