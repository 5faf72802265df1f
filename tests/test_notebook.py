"""The notebook parser, router and REQUEST binding: pure functions on plain data."""

from __future__ import annotations

import ast
import json

import nbformat
import pytest

from kgpool.errors import NotebookError
from kgpool.languages import bind_request
from kgpool.notebook import load_notebook, parse_notebook
from kgpool.requests import RequestData, parse_body, request_document
from kgpool.routes import Router
from kgpool.specs import swagger

pytestmark = [pytest.mark.timeout(30), pytest.mark.channel_independent]  # pure code


def nb_text(*cells: str, language: str = "python") -> str:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "P", "language": language},
                   "language_info": {"name": language}}
    nb.cells = [nbformat.v4.new_markdown_cell(c[3:]) if c.startswith("MD:")
                else nbformat.v4.new_code_cell(c) for c in cells]
    return nbformat.writes(nb)


def test_init_cells_and_endpoints_split() -> None:
    nb = parse_notebook(nb_text("import json", "MD:# GET /md", "# GET /a\nprint(1)", "x = 2"))
    assert [c.source for c in nb.init_cells] == ["import json", "x = 2"]
    # cells are numbered as a notebook user counts them: from 1, markdown included
    assert [(e.method, e.path, e.cells) for e in nb.endpoints] == [("GET", "/a", (3,))]
    assert nb.kernel_name == "python3" and nb.language == "python"


def test_same_annotation_joined_in_order() -> None:
    nb = parse_notebook(nb_text("# POST /x\na = 1", "y = 0", "# POST /x\nb = 2"))
    (ep,) = nb.endpoints
    assert ep.source == "# POST /x\na = 1\n# POST /x\nb = 2"
    assert ep.cells == (1, 3)


def test_response_info_attached() -> None:
    nb = parse_notebook(nb_text("# GET /x\n1", "# ResponseInfo GET /x\nprint('{}')"))
    (ep,) = nb.endpoints
    assert ep.response_source == "# ResponseInfo GET /x\nprint('{}')"
    assert ep.response_cells == (2,)


def test_orphan_response_info_warns() -> None:
    nb = parse_notebook(nb_text("# GET /x\n1", "# ResponseInfo GET /y\nprint('{}')"))
    assert nb.warnings and "/y" in nb.warnings[0] and "cell 2" in nb.warnings[0]
    with pytest.raises(NotebookError, match="cell 2.*--strict"):
        parse_notebook(nb_text("# GET /x\n1", "# ResponseInfo GET /y\nprint('{}')"),
                       strict=True)


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
def test_every_method(method: str) -> None:
    (ep,) = parse_notebook(nb_text(f"# {method} /m")).endpoints
    assert ep.method == method


NEAR_MISSES = ["# get /x", "#GET /x", "# HEAD /x", "# OPTIONS /x", "# ResponseInfo get /x",
               "\n# GET /x", "#\tpost /x", "# Get/x"]


@pytest.mark.parametrize("first_line", NEAR_MISSES)
def test_near_miss_annotation_is_an_init_cell_with_a_warning(first_line: str) -> None:
    # Kernel Gateway runs such a cell at warm-up; so does kgpool, and it says so
    nb = parse_notebook(nb_text("# GET /ok", first_line + "\nprint(1)"))
    assert [c.source for c in nb.init_cells] == [first_line + "\nprint(1)"]
    assert [e.path for e in nb.endpoints] == ["/ok"]
    (warning,) = nb.warnings
    assert warning.startswith("cell 2 (") and "init cell" in warning


@pytest.mark.parametrize("first_line", NEAR_MISSES)
def test_near_miss_annotation_is_an_error_when_strict(first_line: str) -> None:
    with pytest.raises(NotebookError, match=r"cell 2 .*--strict"):
        parse_notebook(nb_text("# GET /ok", first_line + "\nprint(1)"), strict=True)


def test_path_with_whitespace_is_served_literally_with_a_warning() -> None:
    nb = parse_notebook(nb_text("# GET /fakeprint 'I am not a real lang!'", "# GET /x/:id  # c"))
    assert [e.path for e in nb.endpoints] == ["/fakeprint 'I am not a real lang!'", "/x/:id  # c"]
    assert len(nb.warnings) == 2 and all("whitespace" in w for w in nb.warnings)
    r = Router(nb.endpoints)
    assert r.match("/fakeprint%20'I%20am%20not%20a%20real%20lang!'") is not None
    assert r.match("/x/:id%20%20%23%20c") == (r.routes[1], {})  # that segment is a literal
    with pytest.raises(NotebookError, match="whitespace"):
        parse_notebook(nb_text("# GET /a b"), strict=True)


def test_two_spellings_of_one_shape_keep_kernel_gateways_routing() -> None:
    nb = parse_notebook(nb_text("# GET /u/:id\nprint(1)", "# POST /u/:name\nprint(2)"))
    assert "never run" in nb.warnings[0]
    found = Router(nb.endpoints).match("/u/7")
    assert found is not None and found[0].path == "/u/:id" and found[1] == {"id": "7"}
    assert list(found[0].endpoints) == ["GET"]  # so POST /u/7 is a 405, as in Kernel Gateway
    with pytest.raises(NotebookError, match="same URLs"):
        parse_notebook(nb_text("# GET /u/:id", "# POST /u/:name"), strict=True)


def test_kernel_gateway_grammar_details() -> None:
    nb = parse_notebook(nb_text("#  GET   /spaced  \nx", "# PUT\t/tab", "# GET x", "  # GET /y"))
    assert [e.path for e in nb.endpoints] == ["/spaced", "/tab"]
    assert len(nb.init_cells) == 2  # no slash; leading spaces: init cells, as in Kernel Gateway


def test_comments_that_are_not_annotations_are_init_cells() -> None:
    nb = parse_notebook(nb_text("# load the data from disk\nx = 1", "# GET /ok"))
    assert len(nb.init_cells) == 1


def test_no_endpoint_is_an_error() -> None:
    with pytest.raises(NotebookError, match="no endpoint"):
        parse_notebook(nb_text("import json", "MD:# GET /only-markdown"))


def test_unreadable_notebook_is_an_error(tmp_path: object) -> None:
    with pytest.raises(NotebookError, match="not a readable notebook"):
        parse_notebook("{not json")
    with pytest.raises(NotebookError, match="cannot read"):
        load_notebook("/nonexistent/x.ipynb")


def test_bad_param_name_is_an_error() -> None:
    with pytest.raises(NotebookError, match="parameter"):
        parse_notebook(nb_text("# GET /a/:1bad"))


def test_comment_prefix_by_language() -> None:
    nb = parse_notebook(nb_text("// GET /scala\nprintln(1)", "# GET /no", language="scala"))
    assert [e.path for e in nb.endpoints] == ["/scala"]
    assert len(nb.init_cells) == 1


def test_configured_comment_prefix_adds_to_the_languages_own() -> None:
    # Kernel Gateway's NotebookHTTPPersonality.comment_prefix, e.g. {"python": "##"}
    nb = parse_notebook(nb_text("## GET /a", "# GET /b"), prefixes={"python": "##"})
    assert [e.path for e in nb.endpoints] == ["/a", "/b"]


def router(*paths: str) -> Router:
    return Router(parse_notebook(nb_text(*(f"# GET {p}" for p in paths))).endpoints)


def test_router_precedence() -> None:
    r = router("/:a", "/hello/:name", "/hello/world", "/x/:a/:b")
    # ties on the depth of the first parameter keep notebook order
    assert [x.path for x in r.routes] == ["/hello/world", "/hello/:name", "/x/:a/:b", "/:a"]
    assert r.match("/hello/world")[0].path == "/hello/world"  # type: ignore[index]
    assert r.match("/hello/bob") == (r.routes[1], {"name": "bob"})
    assert r.match("/zzz") == (r.routes[3], {"a": "zzz"})
    assert r.match("/hello/a/b") is None


def test_router_literal_and_decoding() -> None:
    r = router("/a.b", "/v:id", "/p/:x")
    assert r.match("/a.b")[0].path == "/a.b"  # type: ignore[index]
    assert r.match("/aXb") is None
    assert r.match("/v42")[1] == {"id": "42"}  # type: ignore[index]
    assert r.match("/v") is None  # a parameter is never empty
    assert r.match("/p/%C3%A9%2F")[1] == {"x": "é/"}  # type: ignore[index]
    assert r.match("/p/") is None


def test_encoded_slash_does_not_fake_a_fixed_path() -> None:
    r = router("/a/b")
    assert r.match("/a%2Fb") is None
    assert r.match("/a/b") is not None


def test_request_document_shape() -> None:
    doc = json.loads(request_document(RequestData(
        body=b'{"k": 1}', content_type="application/json; charset=utf-8",
        query=(("x", "1"), ("x", "2"), ("y", "")), params={"id": "7"},
        headers=(("content-type", "application/json"), ("x-a", "1"), ("X-A", "2")))))
    assert list(doc) == ["body", "args", "path", "headers"]
    assert doc["body"] == {"k": 1}
    assert doc["args"] == {"x": ["1", "2"], "y": [""]}
    assert doc["path"] == {"id": "7"}
    assert doc["headers"] == {"Content-Type": "application/json", "X-A": ["1", "2"]}


@pytest.mark.parametrize("content_type,body,expected", [
    ("application/json", b"[1, 2]", [1, 2]),
    ("application/json", b"nope", "nope"),
    ("application/vnd.api+json", b'{"a": 1}', {"a": 1}),
    ("application/x-www-form-urlencoded; charset=UTF-8", b"a=1&a=%20&b=",
     {"a": ["1", " "], "b": [""]}),
    ("text/plain", b"hi \xc3\xbc", "hi ü"),
    ("", b"", ""),
    ("application/octet-stream", b"\xff\xfe", "\udcff\udcfe"),  # bytes kept, see echo
])
def test_parse_body(content_type: str, body: bytes, expected: object) -> None:
    assert parse_body(body, content_type) == expected


ADVERSARIAL = ["'", '"', "\\", "\n", "\r", "'''", '"""', "\\'", "\x00", "\u2028", "😀",
               "\udcff", "'); import os; os._exit(1); ('", "\\N{BULLET}", "{x}"]


@pytest.mark.parametrize("value", ADVERSARIAL)
def test_python_binding_is_one_exact_literal(value: str) -> None:
    text = json.dumps({"v": value})
    code = bind_request("python", text)
    tree = ast.parse(code)
    assert len(tree.body) == 1 and code.count("\n") == 1
    assign = tree.body[0]
    assert isinstance(assign, ast.Assign) and isinstance(assign.value, ast.Constant)
    assert assign.value.value == text


def test_swagger_document() -> None:
    nb = parse_notebook(nb_text("# GET /a/:id", "# POST /a/:id", "# GET /b"), name="demo")
    spec = swagger([("", nb)])
    ok = {"responses": {"200": {"description": "Success"}}}
    assert spec == {"swagger": "2.0", "info": {"version": "0.0.0", "title": "demo"},
                    "paths": {"/a/:id": {"get": ok, "post": ok}, "/b": {"get": ok}}}
