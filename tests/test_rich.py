"""Rich and binary answers and file uploads (issue 8), on both channels."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import pytest
from conftest import NOTEBOOKS, Server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def rich() -> Iterator[Server]:
    with Server(NOTEBOOKS / "rich.ipynb", "--kernels", "1") as server:
        yield server


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_matplotlib_figure_is_a_png_of_the_right_size(rich: Server) -> None:
    resp = rich.get("/plot")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "image/png"
    assert png_size(resp.body) == (400, 300)  # figsize 4x3 inches at 100 dpi


def test_html_display(rich: Server) -> None:
    resp = rich.get("/html")
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.text == "<h1>Hello</h1>"


def test_bytes_value_is_the_body(rich: Server) -> None:
    resp = rich.get("/bytes")
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert resp.body == bytes(range(256))


def test_svg_value(rich: Server) -> None:
    resp = rich.get("/svg")
    assert resp.headers["Content-Type"].startswith("image/svg+xml")
    assert resp.text.startswith("<svg")


def test_stdout_still_wins(rich: Server) -> None:
    resp = rich.get("/printed")
    assert (resp.headers["Content-Type"], resp.text) == ("text/plain", "stdout wins")


def test_response_info_content_type_picks_the_output(rich: Server) -> None:
    resp = rich.get("/asked")
    assert resp.headers["Content-Type"] == "text/html"
    assert resp.headers["X-Kind"] == "asked"
    assert resp.text == "<p>chosen</p>"


def test_plain_result_keeps_kernel_gateway_bundle(rich: Server) -> None:
    assert rich.get("/frame").json() == {"text/plain": "{'a': 1}"}


def test_multipart_upload_round_trip(rich: Server) -> None:
    payload = bytes(range(256)) * 4
    boundary = "kgpoolBoundary7"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"data.bin\"\r\nContent-Type: application/x-thing\r\n\r\n").encode() \
        + payload + f"\r\n--{boundary}--\r\n".encode()
    resp = rich.request("POST", "/upload", body=body,
                        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert resp.status == 200
    out = json.loads(resp.text)
    assert out["note"] == "hello"
    assert out["file"] == ["data.bin", "application/x-thing", len(payload), payload.hex()]
