"""Writes the test notebooks in this folder from the cell sources below (run it after editing).

Each notebook misbehaves or exercises one feature on purpose; the .ipynb files are committed so
tests read exactly what users would write.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

HERE = Path(__file__).parent


def write(name: str, cells: list[str], language: str = "python", kernel: str = "python3") -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": kernel, "display_name": kernel, "language": language},
                   "language_info": {"name": language}}
    nb.cells = [nbformat.v4.new_markdown_cell(c[3:]) if c.startswith("MD:")
                else nbformat.v4.new_code_cell(c) for c in cells]
    for index, cell in enumerate(nb.cells):
        cell["id"] = f"{name}-{index}"  # stable ids: rewriting changes nothing
    nbformat.write(nb, HERE / f"{name}.ipynb")


KITCHEN = [
    "MD:# Kitchen sink\nOne endpoint per behaviour the tests check.",
    "import json, os, sys, time\nINIT_RUNS = globals().get('INIT_RUNS', 0) + 1\nHITS = 0",
    "# GET /echo\nprint(REQUEST, end='')",
    "# POST /echo\nprint(REQUEST, end='')",
    "# PUT /echo\nprint(REQUEST, end='')",
    "# GET /state\nENDPOINT_RAN = True\nprint(json.dumps({'init_runs': INIT_RUNS, 'pid': os.getpid()}))",
    "# GET /hello/:name\nprint('param ' + json.loads(REQUEST)['path']['name'], end='')",
    "# GET /hello/world\nprint('fixed', end='')",
    "# GET /:anything\nprint('root param', end='')",
    "# GET /a.b\nprint('literal dot', end='')",
    "# GET /trail/\nprint('trailing', end='')",
    "# GET /users/:uid/files/:fid\nprint(json.dumps(json.loads(REQUEST)['path']), end='')",
    "# GET /sleep\nargs = json.loads(REQUEST)['args']\ntime.sleep(float(args.get('s', ['1'])[0]))\n"
    "print(os.getpid(), end='')",
    "# GET /raise\nprint('lost output')\nraise ValueError('boom \"quoted\"')",
    "# GET /input\nname = input('who? ')\nprint(name)",
    "# GET /result\n1 + 1",
    "# GET /empty\nx = 1",
    "# GET /joined\nparts = ['first']",
    "# GET /joined\nparts.append('second')\nprint('+'.join(parts), end='')",
    "# POST /created\nHITS += 1\nprint(json.dumps({'hits': HITS}), end='')",
    "# ResponseInfo POST /created\nprint(json.dumps({'status': 201, 'headers': "
    "{'Content-Type': 'application/json', 'X-Hits': str(HITS)}}))",
    "# GET /badinfo\nprint('body')",
    "# ResponseInfo GET /badinfo\nprint('this is not json')",
    "# DELETE /items/:id\nprint('deleted ' + json.loads(REQUEST)['path']['id'], end='')",
    "# PATCH /items/:id\nprint('patched ' + json.loads(REQUEST)['path']['id'], end='')",
    "# GET /stderr\nprint('to stderr', file=sys.stderr)\nprint('to stdout', end='')",
    "# GET /exit\nos._exit(1)",
    "# GET /loop\nwhile True:\n    pass",
    "# GET /nocontent\nprint('dropped')",
    "# ResponseInfo GET /nocontent\nprint(json.dumps({'status': 204}))",
    # waits in the cell until n requests are in cells at once (each leaves a file in dir), at
    # most `wait` hundredths of a second (default 10 s)
    "# GET /meet\nargs = json.loads(REQUEST)['args']\nn, where = int(args['n'][0]), args['dir'][0]\n"
    "open(os.path.join(where, str(os.getpid())), 'w').close()\n"
    "for _ in range(int(args.get('wait', ['1000'])[0])):\n"
    "    if len(os.listdir(where)) >= n:\n        break\n    time.sleep(0.01)\n"
    "print('met' if len(os.listdir(where)) >= n else 'alone', os.getpid(), end='')",
]

write("kitchen", KITCHEN)
write("init_fails", ["import json", "x = 1\ny = 1 / 0", "# GET /never\nprint('no')"])
write("no_endpoints", ["import json", "MD:# GET /not-code-cells-are-ignored"])
write("bad_annotation", ["# get /lowercase\nprint('x')"])
write("init_sleeps", ["import time\ntime.sleep(3)", "# GET /ok\nprint('ok', end='')"])
# Init fails whenever the file named by KGPOOL_TEST_FLAG exists: lets a test break replacements.
write("flaky_init", [
    "import os, json\nif os.path.exists(os.environ.get('KGPOOL_TEST_FLAG', '/nonexistent')):\n"
    "    raise RuntimeError('flag file present: init refuses')",
    "# GET /ok\nprint(os.getpid(), end='')",
])
# Endpoints that never raise, whatever the request: any 5xx while fuzzing is kgpool's fault.
write("fuzz", [
    "import json, os, math",
    "# GET /echo\nprint(REQUEST, end='')",
    "# POST /echo\nprint(REQUEST, end='')",
    "# GET /env\nprint(json.dumps({k: v for k, v in os.environ.items() if 'KGPOOL' in k or "
    "'TOKEN' in k}), end='')",
    "# PUT /items/:id\nprint(json.dumps(json.loads(REQUEST)['path']), end='')",
    "# DELETE /items/:id\nprint(json.dumps(json.loads(REQUEST)['path']), end='')",
    "# PATCH /items/:id\nprint(json.dumps(json.loads(REQUEST)), end='')",
    "# GET /users/:uid/files/:fid\nprint(json.dumps(json.loads(REQUEST)['path']), end='')",
    "# GET /convert\ntry:\n    angle = float(json.loads(REQUEST)['args'].get('angle', ['0'])[0])\n"
    "    print(json.dumps({'convertedAngle': math.radians(angle)}))\nexcept ValueError as exc:\n"
    "    print(json.dumps({'error': str(exc)}))",
    "# POST /created\nprint(json.dumps({'ok': True}), end='')",
    "# ResponseInfo POST /created\nprint(json.dumps({'status': 201, 'headers': "
    "{'Content-Type': 'application/json'}}))",
])
# Rich and binary answers, uploads: what Kernel Gateway never returned.
write("rich", [
    "import json, base64, io\nimport matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
    "import matplotlib.pyplot as plt\nfrom IPython.display import display, HTML, Image, SVG\n"
    "# figures exactly figsize x dpi, not cropped to their content\n"
    "get_ipython().run_line_magic('config', \"InlineBackend.print_figure_kwargs = "
    "{'bbox_inches': None}\")",
    "# GET /plot\nfig = plt.figure(figsize=(4, 3), dpi=100)\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()",
    "# GET /html\ndisplay(HTML('<h1>Hello</h1>'))",
    "# GET /bytes\nbytes(range(256))",
    "# GET /svg\nSVG('<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"10\" height=\"10\"></svg>')",
    "# GET /printed\nprint('stdout wins', end='')\ndisplay(HTML('<p>ignored</p>'))",
    "# GET /asked\nprint('debug output')\ndisplay(HTML('<p>chosen</p>'))",
    "# ResponseInfo GET /asked\nprint(json.dumps({'headers': {'Content-Type': 'text/html', 'X-Kind': 'asked'}}))",
    "# GET /frame\n{'a': 1}",
    "# POST /upload\nreq = json.loads(REQUEST)\nout = {}\nfor name, values in req['body'].items():\n"
    "    for v in values:\n        if isinstance(v, dict):\n"
    "            out[name] = [v['filename'], v['content_type'], v['size'], "
    "base64.b64decode(v['base64']).hex()]\n        else:\n            out[name] = v\n"
    "print(json.dumps(out), end='')",
])

# Written for Kernel Gateway: the behaviours its own notebook-http suite checks, in our words.
# Sample REQUESTs sit in init cells so the notebook also runs top to bottom by hand.
write("kg_api", [
    "MD:# A Kernel Gateway notebook\nGreetings, a message board and a guest list.",
    "import json, os, sys, time",
    "greeting = 'hi {}'\nguests = ['Ann', 'Bob']",
    "# GET /greet\nprint(greeting.format('all'))",
    "REQUEST = json.dumps({'args': {'who': ['Zed']}})",
    "# GET /greet/who\nprint(greeting.format(json.loads(REQUEST)['args']['who'][0]))",
    "# GET /greet/everyone\nprint(greeting.format(' & '.join(json.loads(REQUEST)['args']['who'])))",
    "# GET /greet/:name\nprint(greeting.format(json.loads(REQUEST)['path']['name']))",
    "# GET /board\nprint(greeting)",
    "# PUT /board\ngreeting = json.loads(REQUEST)['body']\nprint(greeting)",
    "# GET /guests\nprint(json.dumps(guests))",
    "# POST /guests\nguests = json.loads(REQUEST)['body']\nprint(json.dumps(guests))",
    "# DELETE /guests/:at\nguests.pop(int(json.loads(REQUEST)['path']['at']))\nprint(json.dumps(guests))",
    "# GET /broken\nthis is not python",
    "# GET /noise\nprint('out')\nprint('err', file=sys.stderr)",
    "# GET /wait/:seconds\ntime.sleep(float(json.loads(REQUEST)['path']['seconds']))\nprint(os.getpid())",
    "# GET /sum\n40 + 2",
    "# GET /ctype\nprint(json.loads(REQUEST)['headers'].get('Content-Type'))",
    "# GET /header/:name\nprint(json.loads(REQUEST)['headers'].get(json.loads(REQUEST)['path']['name']))",
    "# GET /split\nwords = ['two', 'cells']",
    "# GET /split\nprint(' '.join(words))",
    "# GET /served\nprint('KERNEL_GATEWAY=' + str(os.environ.get('KERNEL_GATEWAY')))",
    "# GET /pid\nprint(os.getpid(), end='')",
])
write("kg_responses", [
    "import json",
    "# GET /doc\nprint('{\"greeting\": \"hi\"}')",
    "# ResponseInfo GET /doc\nprint(json.dumps({'headers': {'Content-Type': 'application/json'}}))",
    "# GET /empty\n",
    "# ResponseInfo GET /empty\nprint(json.dumps({'status': 204}))",
    "# GET /tagged\nprint('{\"greeting\": \"hi\"}')",
    "# ResponseInfo GET /tagged\nprint(json.dumps({'headers': {'Content-Type': 'application/json', 'Etag': 'v42'}}))",
    "",
])
write("kg_two_verbs", ["label = 'start'", "# GET /label\nprint(label)",
                       "# POST /label\nlabel = json.loads(REQUEST)['body']\nprint(label)",
                       "import json"])
# A kernelspec nobody has, and a path with spaces: Kernel Gateway serves it with a forced kernel.
write("kg_unknown_kernel", ["# GET /say 'not a real language'\nprint('said')"],
      language="madeuplang", kernel="madeuplang9")
# Every near miss Kernel Gateway runs as an init cell (and so does kgpool, with a warning).
write("near_misses", [
    "import json\nRAN = []",
    "#GET /tight\nRAN.append('tight')",
    "# get /lower\nRAN.append('lower')",
    "# HEAD /head\nRAN.append('head')",
    "\n# GET /blank-first-line\nRAN.append('blank')",
    "# GET /u/:id\nprint('by id', end='')",
    "# POST /u/:name\nprint('by name', end='')",
    "# GET /spaced path\nprint('spaced', end='')",
    "# ResponseInfo GET /nowhere\nprint('{}')",
    "# GET /ran\nprint(json.dumps(RAN), end='')",
])
# Init takes 4 s in every kernel but the first to start (KGPOOL_TEST_FLAG names a file that only
# the first one creates): readiness must wait for all of them unless told otherwise.
write("staggered", [
    "import os, time\ntry:\n    os.close(os.open(os.environ['KGPOOL_TEST_FLAG'], os.O_CREAT | os.O_EXCL))\n"
    "except FileExistsError:\n    time.sleep(4)",
    "# GET /pid\nprint(os.getpid(), end='')",
])

# ResponseInfo cells that try to break HTTP, and endpoints that misbehave: nothing may wedge,
# desync or leak.
write("hardening", [
    "import json, os, sys, time",
    "# GET /echo\nprint(REQUEST, end='')",
    "# POST /echo\nprint(REQUEST, end='')",
    "# GET /body-type\nprint(type(json.loads(REQUEST)['body']).__name__, end='')",
    "# POST /body-type\nprint(type(json.loads(REQUEST)['body']).__name__, end='')",
    "# GET /pid\nprint(os.getpid(), end='')",
    "# GET /big\nprint('x' * int(json.loads(REQUEST)['args']['n'][0]), end='')",
    "# GET /slow\ntime.sleep(float(json.loads(REQUEST)['args'].get('s', ['1'])[0]))\nprint('slept', end='')",
    "# GET /loop\nwhile True:\n    pass",
    "# GET /exit\nos._exit(7)",
    "# GET /framing/:kind\nprint('0123456789', end='')",
    "# ResponseInfo GET /framing/:kind\nkind = json.loads(REQUEST)['path']['kind']\n"
    "headers = {'length': {'Content-Length': '1'}, 'chunked': {'Transfer-Encoding': 'chunked'},\n"
    "           'close': {'Connection': 'close'}, 'upgrade': {'Upgrade': 'h2c', 'Connection': 'Upgrade'},\n"
    "           'fine': {'X-Fine': 'yes'}}[kind]\n"
    "print(json.dumps({'headers': headers}))",
    "# GET /status/:code\nprint('body', end='')",
    "# ResponseInfo GET /status/:code\nprint(json.dumps({'status': int(json.loads(REQUEST)['path']['code'])}))",
    "# GET /header/:kind\nprint('body', end='')",
    "# ResponseInfo GET /header/:kind\nkind = json.loads(REQUEST)['path']['kind']\n"
    "headers = {'space': {'Bad Name': 'x'}, 'newline': {'X-A': 'a\\r\\nX-Injected: 1'},\n"
    "           'nul': {'X-A': 'a\\x00b'}, 'list': {'X-A': ['a', 'b']}, 'colon': {'X:A': 'b'},\n"
    "           'number': {'X-Count': 3}, 'padded': {'X-Padded': '  v  '}}[kind]\n"
    "print(json.dumps({'headers': headers}))",
])
# Each kernel's warm-up writes when it starts and ends (to the file KGPOOL_TEST_FLAG names).
write("warmup_log", [
    "import os, time\nwith open(os.environ['KGPOOL_TEST_FLAG'], 'a') as f:\n"
    "    f.write(f'start {os.getpid()}\\n')\ntime.sleep(0.3)\n"
    "with open(os.environ['KGPOOL_TEST_FLAG'], 'a') as f:\n    f.write(f'end {os.getpid()}\\n')",
    "# GET /pid\nprint(os.getpid(), end='')",
])
# Tries every way a kernel has to find kgpool's auth token (token_hunt.py, next to it) and
# answers GET /hunt with what it found; an init cell that fails quotes its code and exception.
write("token_hunt", [
    "MD:# Token hunt\nNotebook code hunting for the server's auth token (tests/test_secrets.py).",
    "import json\nwith open('token_hunt.py') as source:\n    HUNT = {'__name__': 'token_hunt'}\n"
    "    exec(compile(source.read(), 'token_hunt.py', 'exec'), HUNT)",
    "# GET /hunt\nprint(json.dumps(HUNT['from_kernel'](json.loads(REQUEST))), end='')",
])
write("init_leaks", [
    "import os\nif os.path.exists(os.environ.get('KGPOOL_TEST_FLAG', '')):\n"
    "    raise RuntimeError('db password is hunter2')",
    "# GET /ok\nprint('ok', end='')",
])

# Batched and streamed endpoints (issue 16): written so that Kernel Gateway, which reads the
# `kgpool:` lines as comments, serves them one request at a time.
write("batching", [
    "import json, os, time\nCALLS = 0",
    "# POST /double\n# kgpool: batch max_size=8 max_wait=0.05\n"
    "requests = REQUESTS if 'REQUESTS' in globals() else [REQUEST]\nCALLS += 1\n"
    "answers = [json.dumps({'x': json.loads(r)['body']['x'] * 2, 'batch': len(requests), "
    "'pid': os.getpid()}) for r in requests]\n"
    "RESPONSES = answers\nif 'REQUESTS' not in globals():\n    print(answers[0])",
    "# POST /shaped\n# kgpool: batch max_size=8 max_wait=0.05\n"
    "out = []\nfor r in REQUESTS:\n    x = json.loads(r)['body']['x']\n"
    "    if x < 0:\n        out.append(ValueError(f'negative: {x}'))\n"
    "    elif x == 0:\n        out.append({'status': 404, 'headers': {'X-Why': 'zero'}, 'body': 'none'})\n"
    "    elif x == 1:\n        out.append(b'\\x00\\x01')\n    else:\n        out.append({'twice': x * 2})\n"
    "RESPONSES = out",
    "# POST /printed\n# kgpool: batch max_size=4 max_wait=0.05\n"
    "print(json.dumps([json.loads(r)['body'] for r in REQUESTS]))",
    "# POST /wrong-count\n# kgpool: batch max_size=4 max_wait=0.05\nRESPONSES = ['only one']",
    "# POST /raises\n# kgpool: batch max_size=4 max_wait=0.05\nraise RuntimeError('whole batch')",
    "# POST /slow\n# kgpool: batch max_size=4 max_wait=0.05\ntime.sleep(float(json.loads(REQUESTS[0])['body']['s']))\n"
    "RESPONSES = ['slept'] * len(REQUESTS)",
    "# POST /patient\n# kgpool: batch max_size=8 max_wait=1.5\nRESPONSES = [str(len(REQUESTS))] * len(REQUESTS)",
    "# GET /calls\nprint(CALLS, end='')",
])
write("streaming", [
    "import json, sys, time",
    "# GET /tokens\n# kgpool: stream\nfor i in range(5):\n    print(f'token {i}', flush=True)\n    time.sleep(0.2)",
    "# GET /events\n# kgpool: stream sse\nfor i in range(5):\n    print(f'event {i}')\n    time.sleep(0.2)",
    "# GET /shown\n# kgpool: stream sse\nfrom IPython.display import display, HTML\nprint('first')\ndisplay(HTML('<b>x</b>'))\nprint('last')",
    "# GET /fails\n# kgpool: stream sse\nprint('partial')\nraise ValueError('midway')",
    "# GET /fails-early\n# kgpool: stream\nraise ValueError('before any output')",
    "# GET /forever\n# kgpool: stream\nwhile True:\n    print('tick', flush=True)\n    time.sleep(0.05)",
    "# GET /flood\n# kgpool: stream\nfor i in range(200):\n    print('x' * 1000)",
    "# GET /endless\n# kgpool: stream\nwhile True:\n    print('x' * 1000, flush=True)\n    time.sleep(0.001)",
    "# GET /stubborn\n# kgpool: stream\nwhile True:\n    try:\n        print('tick', flush=True)\n"
    "        time.sleep(0.05)\n    except KeyboardInterrupt:\n        pass",
    "# GET /lines\n# kgpool: stream sse\nprint('a\\r\\nb\\rc', end='', flush=True)\ntime.sleep(0.05)\n"
    "print('\\r', end='', flush=True)\ntime.sleep(0.05)\nprint('\\nd')",
    "# GET /styled\n# kgpool: stream sse\nprint('styled')",
    "# ResponseInfo GET /styled\nprint(json.dumps({'status': 201, 'headers': {'X-Stream': 'yes'}}))",
    "# GET /quiet\n# kgpool: stream\nx = 1",
])

# A data scientist's first hour (issue 17): the mistakes a new notebook makes, and what the log,
# the answer and `kgpool routes` say about each.
FIRST_HOUR = [
    "MD:# First hour",
    "import json, linecache\nprint('init says hi')",
    "# POST /predict\nreq = json.loads(REQUEST)\nx = req['body']['x']\nprint(json.dumps({'y': x * 2}))",
    "# GET /syntax\nprint('a'\nx = 1",
    "# GET /deep\ndef f(v):\n    return 1 / v\nprint(f(0))",
    "# GET /cache\nprint(json.dumps([len(linecache.cache), len(get_ipython().compile._filename_map)]))",
]
write("first_hour", FIRST_HOUR)
write("other_kernelspec", ["import json", "# GET /ok\nprint('ok', end='')"],
      kernel="conda-env-ds-py")
write("init_syntax", ["import json\nx = (1,", "# GET /ok\nprint('ok', end='')"])

# --fork: init cells run once in a template; the workers forked from it serve. numpy is imported
# on purpose (OpenBLAS starts native threads: fork mode must not refuse it).
FORKED = [
    "import asyncio, json, os, subprocess, sys, time\nimport numpy as np\n"
    "INIT_RUNS = globals().get('INIT_RUNS', 0) + 1\nTEMPLATE = os.getpid()\n"
    "DATA = np.arange(1_000_000, dtype=np.float64)\nHOLD = []",
    "# GET /state\nprint(json.dumps({'init_runs': INIT_RUNS, 'pid': os.getpid(), "
    "'ppid': os.getppid(), 'template': TEMPLATE, 'random': float(np.random.rand()), "
    "'sum': float(DATA.sum())}), end='')",
    "# GET /expr\n6 * 7",
    "# GET /raise\nprint('lost output')\nraise ValueError('boom')",
    "# GET /await\nawait asyncio.sleep(0)\nprint('awaited', os.getpid(), end='')",
    "# GET /await-value\nawait asyncio.sleep(0)\n{'awaited': True}",
    "# GET /await-raise\nawait asyncio.sleep(0)\nraise KeyError('gone')",
    "# POST /await-info\nawait asyncio.sleep(0)\nprint(json.loads(REQUEST)['body'], end='')",
    "# ResponseInfo POST /await-info\nprint(json.dumps({'status': 201, 'headers': "
    "{'X-Kind': 'await'}}))",
    "# GET /stderr\nprint('to stderr', file=sys.stderr)\nprint('to stdout', end='')",
    "# GET /sleep\ntime.sleep(float(json.loads(REQUEST)['args'].get('s', ['0.05'])[0]))\n"
    "print(os.getpid(), end='')",
    "# GET /loop\nwhile True:\n    pass",
    "# GET /hang-with-child\nchild = subprocess.Popen(['sleep', '300'])\n"
    "with open(json.loads(REQUEST)['args']['file'][0], 'w') as out:\n    out.write(str(child.pid))\n"
    "while True:\n    time.sleep(0.01)",
    "# GET /exit\nos._exit(3)",
    "# GET /grow\nHOLD.append(np.ones(int(json.loads(REQUEST)['args']['mb'][0]) * 2**20 // 8))\n"
    "print(len(HOLD), os.getpid(), end='')",
]
write("forked", FORKED)
# Init cells that leave a Python thread running: --fork refuses unless --fork-allow-threads.
write("fork_thread", [
    "import os, threading\nSTOP = threading.Event()\n"
    "threading.Thread(target=STOP.wait, name='poller', daemon=True).start()",
    "# GET /pid\nprint(os.getpid(), end='')",
])
# A stand-in for an initialised torch.cuda (no GPU here): what kgpool asks torch, it answers yes.
write("fork_cuda", [
    "import os, sys, types\ntorch = types.ModuleType('torch')\n"
    "torch.cuda = types.SimpleNamespace(is_initialized=lambda: True)\nsys.modules['torch'] = torch",
    "# GET /pid\nprint(os.getpid(), end='')",
])
# Init cells that open a connection and a file: every worker shares them (a warning says so).
write("fork_fds", [
    "import os, socket\nLEFT, RIGHT = socket.socketpair()\nLOG = open(os.devnull, 'w')",
    "# GET /pid\nprint(os.getpid(), LEFT.fileno(), end='')",
])
# State made of a million small Python objects, all touched by every request: each worker ends up
# with a private copy (reference counts), and kgpool warns that --fork saves little.
write("fork_objects", [
    "import os\nWORDS = [str(i) for i in range(1_000_000)]",
    "# GET /touch\nprint(sum(len(w) for w in WORDS), os.getpid(), end='')",
])
