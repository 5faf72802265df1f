"""matplotlib figures as answers, whatever the backend, on both channels (tests/run.sh runs this
module again with KGPOOL_CHANNEL=jupyter): each recipe of README's "Answering with a plot"."""

from __future__ import annotations

import base64
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from conftest import NOTEBOOKS, ROOT, Server

import kgpool.testing

pytestmark = pytest.mark.timeout(120)
CHANNEL = os.environ.get("KGPOOL_CHANNEL", "direct")


@pytest.fixture(scope="module")
def agg() -> Iterator[Server]:
    with Server(NOTEBOOKS / "plots_agg.ipynb", "--kernels", "1") as server:
        yield server


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:40]
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.parametrize("path,size", [
    ("/figure", (400, 300)),  # a pyplot figure as the cell's value
    ("/figure-object", (200, 100)),  # a Figure made without pyplot
    ("/show", (300, 200)),  # plt.show()
    ("/show-two", (200, 200)),  # plt.show() with two figures open: the last one
    ("/display", (200, 100)),  # display(fig)
    ("/display-image", (100, 100)),  # display(Image(png bytes))
    ("/svg-backend", (100, 200)),  # another non-GUI backend
])
def test_figure_answers_as_png_under_agg(agg: Server, path: str, size: tuple[int, int]) -> None:
    resp = agg.get(path)
    assert resp.status == 200, resp.text
    assert resp.headers["Content-Type"] == "image/png"
    assert png_size(resp.body) == size


def test_show_closes_the_figures_it_showed(agg: Server) -> None:
    assert agg.get("/show-two").status == 200
    assert agg.get("/open-figures").text == "0"


def test_bytes_with_an_image_content_type(agg: Server) -> None:
    resp = agg.get("/bytes")
    assert resp.headers["Content-Type"] == "image/png"
    assert png_size(resp.body) == (100, 200)


def test_printed_base64_stays_base64_text_as_in_kernel_gateway(agg: Server) -> None:
    """Kernel Gateway 3.0.1 sends what the cell printed, labelled image/png as ResponseInfo
    says: clients that decode the base64 themselves keep working."""
    resp = agg.get("/base64")
    assert resp.headers["Content-Type"] == "image/png"
    assert resp.body.endswith(b"\n")  # print's newline, as Kernel Gateway sends it
    assert png_size(base64.b64decode(resp.body)) == (100, 200)


def test_an_empty_figure_is_its_text_as_in_jupyter(agg: Server) -> None:
    resp = agg.get("/empty")
    assert resp.json() == {"text/plain": "<Figure size 640x480 with 0 Axes>"}


def test_inline_backend_keeps_its_own_formatter() -> None:
    with Server(NOTEBOOKS / "plots_inline.ipynb", "--kernels", "1") as server:
        assert server.get("/backend").text == "module://matplotlib_inline.backend_inline"
        resp = server.get("/figure")
        assert resp.headers["Content-Type"] == "image/png"
        assert png_size(resp.body) == (400, 300)


def test_kernels_without_matplotlib_do_not_import_it() -> None:
    with Server(NOTEBOOKS / "plots_none.ipynb", "--kernels", "1") as server:
        assert server.get("/modules").json() == []


async def test_the_readme_recipe_as_written() -> None:
    """README's init block and `# GET /plot` cell, as a notebook: a 400x300 PNG."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n### Answering with a plot\n", 1)[1].split("\n### ", 1)[0]
    init, endpoint = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    assert endpoint.startswith("# GET /plot\n")
    notebook = nbformat.v4.new_notebook()
    notebook.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                        "language": "python"}}
    notebook.cells = [nbformat.v4.new_code_cell(init), nbformat.v4.new_code_cell(endpoint)]
    with tempfile.TemporaryDirectory(prefix="kgpool-test-plot-") as folder:
        path = Path(folder) / "plot.ipynb"
        nbformat.write(notebook, path)
        async with kgpool.testing.serve(path, channel=CHANNEL) as client:
            resp = await client.get("/plot")
            again = await client.get("/plot")
    assert resp.status == 200 and resp.content_type == "image/png"
    assert png_size(resp.content) == (400, 300)
    assert again.content == resp.content
