"""Writes parity.ipynb: cells written the way notebook authors write them, each an endpoint.

tests/test_parity.py calls every endpoint of the notebook, in notebook order, on a direct-channel
server and on a Jupyter-channel server and requires the same status, headers and body. Cells
that depend on earlier ones (`_`, threads left running, events) rely on that order. Run this
script after editing; the .ipynb file is committed.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

HERE = Path(__file__).parent

INIT = """\
import base64, contextlib, ctypes, getpass, io, json, logging, math, os, subprocess, sys
import threading, time, warnings
import multiprocessing as mp
import numpy as np
import matplotlib
matplotlib.use('module://matplotlib_inline.backend_inline')
import matplotlib.pyplot as plt
from IPython.display import (HTML, JSON, SVG, Image, Markdown, clear_output, display,
                             update_display)
get_ipython().run_line_magic('config', "InlineBackend.print_figure_kwargs = {'bbox_inches': None}")

try:
    import pandas as pd
except ImportError:  # the same display machinery, without pandas
    pd = None

class Frame:
    def __init__(self, columns):
        self.columns = columns
    def _repr_html_(self):
        head = ''.join(f'<th>{k}</th>' for k in self.columns)
        rows = zip(*self.columns.values())
        body = ''.join('<tr>' + ''.join(f'<td>{v}</td>' for v in row) + '</tr>' for row in rows)
        return f'<table><tr>{head}</tr>{body}</table>'
    def __repr__(self):
        return '\\n'.join(f'{k}: {v}' for k, v in self.columns.items())

def frame(columns):
    return pd.DataFrame(columns) if pd is not None else Frame(columns)

class Rich:
    def _repr_html_(self): return '<b>rich</b>'
    def _repr_latex_(self): return r'$\\alpha$'
    def _repr_json_(self): return {'rich': True}
    def __repr__(self): return 'Rich()'

class Bundle:
    def _repr_mimebundle_(self, include=None, exclude=None):
        return {'text/plain': 'bundle', 'text/markdown': '**bundle**'}

class BadHtml:
    def _repr_html_(self): raise ValueError('html failed')
    def __repr__(self): return 'BadHtml()'

class Unprintable(Exception):
    def __str__(self): raise RuntimeError('no str for you')

PNG = base64.b64decode(
    'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==')
LOG = logging.getLogger('parity')
LOG.addHandler(logging.StreamHandler(sys.stdout))  # made at init: holds the stream object
LOG.setLevel(logging.INFO)
LOG.propagate = False

EVENTS = []
def _pre(info):
    EVENTS.append(('pre', type(info).__name__, info.raw_cell.splitlines()[1:2], info.silent,
                   info.store_history))
def _post(result):
    EVENTS.append(('post', type(result).__name__, result.success,
                   type(result.error_in_exec).__name__))
get_ipython().events.register('pre_run_cell', _pre)
get_ipython().events.register('post_run_cell', _post)
FIRED = []
get_ipython().events.register('pre_execute', lambda: FIRED.append('pre_execute'))
get_ipython().events.register('post_execute', lambda: FIRED.append('post_execute'))
"""

# (name, source): each becomes "# GET /name" (or the method before the name, "POST /x").
CELLS: list[tuple[str, str]] = [
    # prints and values
    ("print", "print('hello')"),
    ("print-args", "print('a', 'b', 3, sep='-', end='!')"),
    ("print-loop", "for i in range(3):\n    print(i)"),
    ("value", "40 + 2"),
    ("value-str", "'a string'"),
    ("value-dict", "{'a': 1, 'b': [1, 2, 3]}"),
    ("value-list", "[x ** 2 for x in range(5)]"),
    ("value-none", "None"),
    ("print-none", "print(None)"),
    ("assign", "x = 1"),
    ("call-none", "def f():\n    pass\nf()"),
    ("float", "0.1 + 0.2"),
    ("bigint", "2 ** 200"),
    ("json-str", "json.dumps({'k': [1, 2]})"),
    ("write", "sys.stdout.write('written')"),
    ("empty-print", "print(end='')"),
    ("flush", "print('one', flush=True)\nsys.stdout.flush()\nprint('two')"),
    # the request
    ("args", "req = json.loads(REQUEST)\nprint(json.dumps(req['args'], sort_keys=True))"),
    ("header", "print(json.loads(REQUEST)['headers'].get('X-Parity'))"),
    ("POST echo", "print(json.dumps(json.loads(REQUEST)['body']))"),
    ("raw-bytes", "print(json.loads(REQUEST)['args']['raw'][0], end='')"),
    ("params/:name", "print(json.loads(REQUEST)['path']['name'])"),
    # trailing semicolons
    ("semicolon", "1 + 1;"),
    ("semicolon-name", "v = 5\nv;"),
    ("semicolon-comment", "'quiet';  # a comment after the semicolon"),
    ("semicolon-print", "print('still printed');"),
    ("semicolon-display", "display(HTML('<p>shown</p>'));"),
    ("semicolon-magic", "%precision 2\nmath.e;"),
    # unicode and large
    ("unicode", "print('héllo wörld ✓ 日本語 🎉')"),
    ("unicode-value", "'naïve café'"),
    ("control-chars", "print('\\t tab\\r\\n crlf \\x1b[31m ansi \\x1b[0m')"),
    ("large-print", "print('x' * 200_000)"),
    ("many-lines", "print('\\n'.join(str(i) for i in range(20_000)))"),
    ("large-value", "'y' * 100_000"),
    # displays
    ("display-html", "display(HTML('<b>bold</b>'))"),
    ("value-html", "HTML('<i>value</i>')"),
    ("display-markdown", "display(Markdown('# Title'))"),
    ("display-raw-json", "display({'application/json': {'a': 1}}, raw=True)"),
    ("display-many", "display(1, 2, 3)"),
    ("update-display", "display('first', display_id='d1')\nupdate_display('second', display_id='d1')"),
    ("display-handle", "h = display(HTML('<p>v1</p>'), display_id=True)\nh.update(HTML('<p>v2</p>'))"),
    ("clear-output", "display(HTML('<p>a</p>'))\nclear_output()\ndisplay(HTML('<p>b</p>'))"),
    ("clear-wait", "display('gone')\nclear_output(wait=True)\ndisplay('after wait')"),
    ("stdout-wins", "print('text wins')\ndisplay(HTML('<p>ignored</p>'))"),
    ("rich-value", "Rich()"),
    ("rich-display", "display(Rich())"),
    ("mimebundle", "Bundle()"),
    ("json-display", "JSON({'a': [1, 2]})"),
    ("svg", "SVG('<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"4\" height=\"4\"></svg>')"),
    ("dataframe", "frame({'a': [1, 2], 'b': ['x', 'y']})"),
    ("dataframe-print", "print(frame({'a': [1, 2], 'b': ['x', 'y']}))"),
    ("numpy", "np.arange(6).reshape(2, 3)"),
    ("numpy-print", "print(np.eye(2))"),
    ("figure", "plt.figure(figsize=(2, 1), dpi=40)\nplt.plot([1, 2, 3])\nplt.show()"),
    ("figure-implicit", "fig = plt.figure(figsize=(1, 1), dpi=30)\nplt.plot([3, 1])"),
    ("image", "display(Image(data=PNG))"),
    ("bytes", "bytes(range(256))"),
    ("bytes-literal", "b'hello bytes'"),
    ("bytearray", "bytearray(b'abc')"),
    ("large-html", "HTML('<p>' + 'z' * 100_000 + '</p>')"),
    # errors of every kind
    ("value-error", "raise ValueError('boom')"),
    ("key-error", "{}['missing']"),
    ("zero-division", "1 / 0"),
    ("name-error", "undefined_name_xyz"),
    ("attribute-error", "None.attr"),
    ("int-parse", "int('not a number')"),
    ("assertion", "assert 1 == 2, 'nope'"),
    ("custom-error", "class MyError(Exception):\n    pass\nraise MyError('custom')"),
    ("chained", "raise RuntimeError('outer') from ValueError('inner')"),
    ("exception-group", "raise ExceptionGroup('many', [ValueError('a'), TypeError('b')])"),
    ("exit-code", "sys.exit(2)"),
    ("exit-message", "sys.exit('bye')"),
    ("system-exit", "raise SystemExit"),
    ("keyboard-interrupt", "raise KeyboardInterrupt"),
    ("sigint", "import signal\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(1)\nprint('no')"),
    ("recursion", "def r():\n    return r()\nr()"),
    ("recursion-caught", "def deep(n):\n    return deep(n + 1)\ntry:\n    deep(0)\nexcept RecursionError as exc:\n    print('caught', type(exc).__name__)"),
    ("print-then-raise", "print('before')\nraise ValueError('after print')"),
    ("runtime-syntax", "exec('1 +')"),
    ("raised-syntax", "raise SyntaxError('handmade')"),
    ("import-error", "import nonexistent_module_xyz"),
    ("repr-fails", "BadHtml()"),
    ("display-repr-fails", "display(BadHtml())\nprint('after')"),
    ("str-fails", "raise Unprintable()"),
    ("stop-iteration", "next(iter([]))"),
    ("unicode-error", "raise ValueError('unicode ✗ message')"),
    ("type-error", "len(5)"),
    # warnings and stderr: not the body
    ("warning", "warnings.warn('careful')\nprint('ok')"),
    ("deprecation", "warnings.warn('old', DeprecationWarning)\n7"),
    ("warning-as-error", "with warnings.catch_warnings():\n    warnings.simplefilter('error')\n    warnings.warn('now an error')"),
    ("stderr-only", "print('to stderr', file=sys.stderr)"),
    ("stderr-and-stdout", "print('err', file=sys.stderr)\nprint('out')\nos.write(2, b'fd2\\n')"),
    # stdin
    ("input", "name = input('who? ')\nprint(name)"),
    ("getpass", "getpass.getpass()"),
    # magics
    ("env-set", "%env PARITY_VAR=1"),
    ("env-get", "%env PARITY_VAR"),
    ("precision", "%precision 3\nmath.pi"),
    ("precision-reset", "%precision\nmath.pi"),
    ("pwd", "here = %pwd\nos.path.basename(here)"),
    ("cell-magic-below", "%%timeit\n1"),
    ("unknown-magic", "%nonexistent_magic_xyz"),
    ("timeit-quiet", "%timeit -q -n1 -r1 pass"),
    ("sx", "%sx echo sx"),
    ("who-type", "%who int"),
    ("capture", "from IPython.utils.capture import capture_output\nwith capture_output() as c:\n    print('hidden')\n    display('hidden too')\nprint(repr(c.stdout), len(c.outputs))"),
    ("redirect", "buf = io.StringIO()\nwith contextlib.redirect_stdout(buf):\n    print('redirected')\nprint(buf.getvalue().upper(), end='')"),
    ("logging", "LOG.info('logged to stdout')"),
    ("nested-run-cell", "get_ipython().run_cell('print(\"nested\")');"),
    ("help", "help(len)"),
    ("question", "len?"),
    # shell escapes
    ("shell", "!echo hi"),
    ("shell-vars", "!echo {1 + 2} $PARITY_VAR"),
    ("shell-no-newline", "!printf 'no newline'"),
    ("shell-fails", "!ls /nonexistent-dir-xyz\nprint(_exit_code)"),
    ("shell-exit", "!exit 3\nprint(_exit_code)"),
    ("shell-capture", "files = !printf 'a\\nb\\n'\nfiles"),
    # subprocesses and C-level writes
    ("os-system", "os.system('echo hi')"),
    ("subprocess-run", "subprocess.run(['echo', 'hi'])"),
    ("subprocess-shell", "subprocess.run('echo out; echo err >&2', shell=True);"),
    ("check-output", "subprocess.check_output(['echo', 'captured'])"),
    ("popen", "p = subprocess.Popen(['printf', 'popen'])\np.wait()\nprint(' waited')"),
    ("os-write", "os.write(1, b'raw fd\\n')"),
    ("order", "print('a')\nos.write(1, b'b\\n')\nprint('c')\nos.system('echo d')\nprint('e')"),
    ("c-puts", "ctypes.CDLL(None).puts(b'from C');"),
    ("c-printf-no-newline", "libc = ctypes.CDLL(None)\nlibc.printf(b'partial line')\nprint(' then python')"),
    ("large-subprocess", "os.system('seq 1 50000');"),
    ("child-python", "subprocess.run([sys.executable, '-c', 'print(\"child python\")']);"),
    ("dunder-stdout", "sys.__stdout__.write('dunder stdout\\n');"),
    ("fd-unicode", "os.write(1, 'fd ünïcode ✓\\n'.encode())"),
    ("fd-invalid-utf8", "os.write(1, b'bad \\xff\\xfe bytes\\n');"),
    ("multiprocessing", "def work(n):\n    print('worker', n)\n    return n * n\nwith mp.get_context('fork').Pool(1) as pool:\n    squares = pool.map(work, range(3))\nprint(squares)"),
    ("thread-joined", "t = threading.Thread(target=lambda: print('from thread'))\nt.start()\nt.join()\nprint('main')"),
    # what earlier cells left behind
    ("thread-left", "GO, DONE = threading.Event(), threading.Event()\ndef later():\n    GO.wait(10)\n    print('leftover thread output')\n    os.write(1, b'')\n    DONE.set()\nthreading.Thread(target=later, daemon=True).start()\nprint('started')"),
    ("thread-next", "GO.set()\nDONE.wait(10)\nprint('next request')"),
    ("process-left", "subprocess.Popen(['sh', '-c', 'sleep 0.3; echo late output'])\nprint('spawned')"),
    ("process-next", "time.sleep(0.8)\nprint('after the late output')"),
    ("value-for-underscore", "21 * 2"),
    ("underscore", "print(_, repr(__), type(___).__name__)"),
    ("out-cache", "'cached'"),
    ("out-read", "print(_ == 'cached', Out.get(get_ipython().execution_count) == 'cached')"),
    ("events", "print(EVENTS[-2:])"),
    ("execute-events", "print(FIRED[-3:])"),
    ("history", "hm = get_ipython().history_manager\nprint(len(hm.input_hist_parsed), "
     "sum(len(v) for v in hm.outputs.values()))"),
    ("object-repr", "object()"),
    ("await", "import asyncio\nawait asyncio.sleep(0)\nprint('awaited')"),
    ("syntax-error", "def broken(:\n    pass"),
    ("generator", "(i for i in range(3))"),
]

# ResponseInfo cells for some endpoints above or below: (name, endpoint source, info source)
WITH_INFO: list[tuple[str, str, str]] = [
    ("info-created", "print(json.dumps({'made': True}))",
     "print(json.dumps({'status': 201, 'headers': {'Content-Type': 'application/json', "
     "'X-Parity': 'yes'}}))"),
    ("info-html", "display(HTML('<p>asked</p>'))\nprint('debug')",
     "print(json.dumps({'headers': {'Content-Type': 'text/html'}}))"),
    ("info-semicolon", "print('body')", "print(json.dumps({'status': 202}));"),
    ("info-raises", "print('body')", "raise RuntimeError('info failed')"),
    ("info-after-error", "raise ValueError('endpoint failed')",
     "print(json.dumps({'status': 299}))"),
    ("info-fd", "print('body')", "os.system('echo \\'{\"status\": 203}\\'');"),
]


def route(name: str) -> str:
    method, _, path = name.rpartition(" ")
    return f"{method or 'GET'} /{path}"


def main() -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "python3",
                                  "language": "python"},
                   "language_info": {"name": "python"}}
    sources = [INIT] + [f"# {route(name)}\n{src}" for name, src in CELLS]
    for name, src, info in WITH_INFO:
        sources += [f"# {route(name)}\n{src}", f"# ResponseInfo {route(name)}\n{info}"]
    nb.cells = [nbformat.v4.new_code_cell(src) for src in sources]
    for index, cell in enumerate(nb.cells):
        cell["id"] = f"parity-{index}"  # stable ids: rewriting changes nothing
    nbformat.write(nb, HERE / "parity.ipynb")


if __name__ == "__main__":
    main()
