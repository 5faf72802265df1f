"""Which notebooks are served where: files, folders, prefixes, clashes, kgpool's own paths."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from prometheus_client import CollectorRegistry

from kgpool.config import Settings
from kgpool.errors import ConfigError, NotebookError
from kgpool.metrics import Metrics
from kgpool.mounts import Mounts, mount_specs

pytestmark = [pytest.mark.timeout(20), pytest.mark.channel_independent]


def notebook(path: Path, *cells: str) -> str:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "P", "language": "python"},
                   "language_info": {"name": "python"}}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)
    return str(path)


def mounts(*notebooks: str, **kw: object) -> Mounts:
    settings = Settings(notebooks=notebooks, **kw)  # type: ignore[arg-type]
    return Mounts(mount_specs(settings), settings, Metrics(CollectorRegistry()))


def test_one_notebook_at_the_root_several_under_their_names(tmp_path: Path) -> None:
    a = notebook(tmp_path / "a.ipynb", "# GET /x")
    b = notebook(tmp_path / "b.ipynb", "# GET /x")
    assert [(s.name, s.prefix) for s in mount_specs(Settings(notebooks=(a,)))] == [("a", "")]
    specs = mount_specs(Settings(notebooks=(a, f"{b}=/v2/b"), kernels=2, kernels_for="b=3"))
    assert [(s.name, s.prefix, s.kernels) for s in specs] == [("a", "/a", 2), ("b", "/v2/b", 3)]
    folder = mount_specs(Settings(notebooks=(str(tmp_path),)))
    assert [s.prefix for s in folder] == ["/a", "/b"]


@pytest.mark.parametrize("args,message", [
    ((), "at least one NOTEBOOK"),
    (("{tmp}=/x",), "a folder takes no prefix"),
    (("{a}=/bad prefix",), "prefix"),
    (("{a}", "{a}=/other"), "named 'a'"),
    (("{a}=/same", "{b}=/same"), "served under /same"),
])
def test_bad_mount_arguments(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    a = notebook(tmp_path / "a.ipynb", "# GET /x")
    b = notebook(tmp_path / "b.ipynb", "# GET /y")
    filled = tuple(x.format(tmp=tmp_path, a=a, b=b) for x in args)
    with pytest.raises(ConfigError, match=message):
        mount_specs(Settings(notebooks=filled))
    with pytest.raises(ConfigError, match="--kernels-for"):
        mount_specs(Settings(notebooks=(a,), kernels_for="nobody=2"))


def test_routes_of_two_notebooks_that_clash(tmp_path: Path) -> None:
    a = notebook(tmp_path / "a.ipynb", "# GET /x/y")
    b = notebook(tmp_path / "b.ipynb", "# GET /y")
    with pytest.raises(ConfigError, match="route clash"):
        mounts(a, f"{b}=/a/x")
    served = mounts(a, f"{b}=/b")
    found = served.match("/b/y")
    assert found is not None and found[0].name == "b" and found[1].path == "/y"


def test_a_notebook_route_takes_a_kgpool_path_only_when_literal(tmp_path: Path) -> None:
    takes = mounts(notebook(tmp_path / "m.ipynb", "# GET /metrics", "# GET /:p"))
    assert takes.kgpool_path("/metrics") is None  # the notebook's
    assert takes.kgpool_path("/_kgpool/metrics") == "/metrics"
    assert takes.kgpool_path("/healthz") == "/healthz"  # a parameter never takes it
    assert takes.kgpool_path("/_kgpool/nothing") is None
    with pytest.raises(ConfigError, match="--strict"):
        mounts(notebook(tmp_path / "s.ipynb", "# GET /readyz"), strict=True)


def test_strict_and_comment_prefixes_reach_the_parser(tmp_path: Path) -> None:
    odd = notebook(tmp_path / "odd.ipynb", "#GET /x\nx = 1", "## GET /y")
    with pytest.raises(NotebookError, match="--strict"):
        mounts(odd, strict=True)
    served = mounts(odd, comment_prefix="python=##")
    assert served.match("/y") is not None and served.match("/x") is None
