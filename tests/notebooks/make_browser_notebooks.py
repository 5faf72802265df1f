"""Writes the notebooks of the real-browser tests (tests/test_browser.py); run it after editing.

browser_echo: endpoints a page on another origin calls with fetch() (CORS), plus a path
parameter for the index page's try-it form and a slow endpoint that keeps the only kernel busy.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

HERE = Path(__file__).parent


def write(name: str, cells: list[str]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                  "language": "python"},
                   "language_info": {"name": "python"}}
    nb.cells = [nbformat.v4.new_markdown_cell(c[3:]) if c.startswith("MD:")
                else nbformat.v4.new_code_cell(c) for c in cells]
    for index, cell in enumerate(nb.cells):
        cell["id"] = f"{name}-{index}"  # stable ids: rewriting changes nothing
    nbformat.write(nb, HERE / f"{name}.ipynb")


# X-Hidden is set by the notebook but never exposed: a browser must not be able to read it.
ECHO_INFO = ("print(json.dumps({'status': 200, 'headers': {'Content-Type': 'application/json', "
             "'X-Hidden': 'not-exposed'}}))")

write("browser_echo", [
    "MD:# Browser tests\nEndpoints called from headless Chromium.",
    "import json, time",
    ("# GET /echo\nreq = json.loads(REQUEST)\n"
     "print(json.dumps({'method': 'GET', 'args': req['args'], "
     "'custom': req['headers'].get('X-Custom')}))"),
    "# ResponseInfo GET /echo\n" + ECHO_INFO,
    ("# POST /echo\nreq = json.loads(REQUEST)\n"
     "print(json.dumps({'method': 'POST', 'body': req['body'], "
     "'custom': req['headers'].get('X-Custom')}))"),
    "# ResponseInfo POST /echo\n" + ECHO_INFO,
    "# PUT /echo\nprint(json.dumps({'method': 'PUT'}))",
    "# GET /hello/:name\nprint('hello ' + json.loads(REQUEST)['path']['name'], end='')",
    ("# GET /sleep\nargs = json.loads(REQUEST)['args']\n"
     "time.sleep(float(args.get('s', ['1'])[0]))\nprint('slept', end='')"),
])
