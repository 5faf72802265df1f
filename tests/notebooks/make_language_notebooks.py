"""Writes lang_<language>.ipynb: one notebook per non-Python kernel, written as for Kernel Gateway.

Every notebook has the same endpoints (tests/test_languages.py runs the same checks on each),
each in its language's own idiom: its comment syntax, its JSON library, its way to sleep,
fail and kill its own kernel. Run it after editing; the .ipynb files are committed.

    /echo (GET, POST, PUT)   print REQUEST exactly
    /hello/:name, /hello/world, /users/:uid/files/:fid   path parameters and precedence
    /joined                  two cells with one annotation, joined
    /created (POST)          a ResponseInfo cell: 201, JSON printed the language's way
    /badinfo                 a ResponseInfo cell printing no JSON
    /raise                   prints, then fails
    /sleep?s=N               sleeps, then prints the kernel's pid
    /pid, /state, /nothing   the kernel's pid; init-cell state; a cell that prints nothing
    /exit                    kills its own kernel process
    /items/:id (DELETE)      another method
"""

from __future__ import annotations

from pathlib import Path

import nbformat

HERE = Path(__file__).parent


def write(name: str, cells: list[str], *, language: str, kernel: str, display: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": kernel, "display_name": display, "language": language},
                   "language_info": {"name": language}}
    nb.cells = [nbformat.v4.new_markdown_cell(c[3:]) if c.startswith("MD:")
                else nbformat.v4.new_code_cell(c) for c in cells]
    for index, cell in enumerate(nb.cells):
        cell["id"] = f"{name}-{index}"  # stable ids: rewriting changes nothing
    nbformat.write(nb, HERE / f"{name}.ipynb")


# bash has no JSON parser of its own: the endpoints that read REQUEST ask python3, as a
# shell script would ask jq.
PY_PATH = "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"path\"][\"{0}\"], end=\"\")'"
BASH = [
    "MD:# bash endpoints\nThe same endpoints as every lang_* notebook.",
    "INIT_RUNS=$((INIT_RUNS + 1))\nHITS=0",
    "# GET /echo\nprintf '%s' \"$REQUEST\"",
    "# POST /echo\nprintf '%s' \"$REQUEST\"",
    "# PUT /echo\nprintf '%s' \"$REQUEST\"",
    "# GET /hello/:name\nname=$(printf '%s' \"$REQUEST\" | " + PY_PATH.format("name") + ")\n"
    "printf 'hello %s' \"$name\"",
    "# GET /hello/world\nprintf 'fixed'",
    "# GET /users/:uid/files/:fid\nprintf '%s' \"$REQUEST\" | python3 -c "
    "'import json,sys; print(json.dumps(json.load(sys.stdin)[\"path\"]), end=\"\")'",
    "# GET /joined\nPARTS=first",
    "# GET /joined\nPARTS=\"$PARTS+second\"\nprintf '%s' \"$PARTS\"",
    "# POST /created\nHITS=$((HITS + 1))\nprintf '{\"hits\": %d}' \"$HITS\"",
    "# ResponseInfo POST /created\nprintf '{\"status\": 201, \"headers\": "
    "{\"Content-Type\": \"application/json\", \"X-Hits\": \"%d\"}}' \"$HITS\"",
    "# GET /badinfo\nprintf 'body'",
    "# ResponseInfo GET /badinfo\nprintf 'this is not json'",
    "# GET /raise\necho 'lost output'\nls /nonexistent-kgpool-path",
    "# GET /sleep\nsleep \"$(printf '%s' \"$REQUEST\" | python3 -c "
    "'import json,sys; print(json.load(sys.stdin)[\"args\"][\"s\"][0])')\"\nprintf '%s' \"$PPID\"",
    "# GET /pid\nprintf '%s' \"$PPID\"",  # bash runs under bash_kernel, the kernel process
    "# GET /state\nprintf '%s' \"$INIT_RUNS\"",
    "# GET /nothing\nUNUSED=1",
    "# GET /exit\nkill -9 \"$PPID\"",
    "# DELETE /items/:id\nprintf 'deleted %s' \"$(printf '%s' \"$REQUEST\" | "
    + PY_PATH.format("id") + ")\"",
]

R = [
    "MD:# R endpoints\nThe same endpoints as every lang_* notebook.",
    "library(jsonlite)\nINIT_RUNS <- if (exists(\"INIT_RUNS\")) INIT_RUNS + 1 else 1\nHITS <- 0",
    "# GET /echo\ncat(REQUEST)",
    "# POST /echo\ncat(REQUEST)",
    "# PUT /echo\ncat(REQUEST)",
    "# GET /hello/:name\nreq <- fromJSON(REQUEST)\ncat(paste0(\"hello \", req$path$name))",
    "# GET /hello/world\ncat(\"fixed\")",
    "# GET /users/:uid/files/:fid\ncat(toJSON(fromJSON(REQUEST)$path, auto_unbox = TRUE))",
    "# GET /joined\nparts <- \"first\"",
    "# GET /joined\nparts <- c(parts, \"second\")\ncat(paste(parts, collapse = \"+\"))",
    "# POST /created\nHITS <- HITS + 1\ncat(toJSON(list(hits = HITS), auto_unbox = TRUE))",
    "# ResponseInfo POST /created\ncat(toJSON(list(status = 201, headers = list("
    "`Content-Type` = \"application/json\", `X-Hits` = as.character(HITS))), auto_unbox = TRUE))",
    "# GET /badinfo\ncat(\"body\")",
    "# ResponseInfo GET /badinfo\ncat(\"this is not json\")",
    "# GET /raise\ncat(\"lost output\")\nstop(\"boom \\\"quoted\\\"\")",
    "# GET /sleep\nSys.sleep(as.numeric(fromJSON(REQUEST)$args$s[1]))\ncat(Sys.getpid())",
    "# GET /pid\ncat(Sys.getpid())",
    "# GET /state\ncat(INIT_RUNS)",
    "# GET /nothing\nunused <- 1",
    "# GET /exit\ntools::pskill(Sys.getpid(), tools::SIGKILL)",
    "# DELETE /items/:id\ncat(paste(\"deleted\", fromJSON(REQUEST)$path$id))",
]

# Kernel Gateway's notebooks for Octave use `#` (its default); Octave's own `%` works in kgpool.
OCTAVE = [
    "MD:# Octave endpoints\nThe same endpoints as every lang_* notebook.",
    "if exist('INIT_RUNS', 'var'), INIT_RUNS += 1; else, INIT_RUNS = 1; end\nHITS = 0;",
    "# GET /echo\nprintf('%s', REQUEST)",
    "# POST /echo\nprintf('%s', REQUEST)",
    "# PUT /echo\nprintf('%s', REQUEST)",
    "# GET /hello/:name\nreq = jsondecode(REQUEST);\nprintf('hello %s', req.path.name)",
    "# GET /hello/world\nprintf('fixed')",
    "# GET /users/:uid/files/:fid\nreq = jsondecode(REQUEST);\nprintf('%s', jsonencode(req.path))",
    "# GET /joined\nparts = 'first';",
    "# GET /joined\nparts = [parts '+second'];\nprintf('%s', parts)",
    "# POST /created\nHITS += 1;\nprintf('{\"hits\": %d}', HITS)",
    "# ResponseInfo POST /created\nprintf('{\"status\": 201, \"headers\": "
    "{\"Content-Type\": \"application/json\", \"X-Hits\": \"%d\"}}', HITS)",
    "# GET /badinfo\nprintf('body')",
    "# ResponseInfo GET /badinfo\nprintf('this is not json')",
    "# GET /raise\nprintf('lost output\\n');\nerror('boom \"quoted\"')",
    "# GET /sleep\nreq = jsondecode(REQUEST);\npause(str2double(req.args.s{1}));\n"
    "printf('%d', getppid())",
    "# GET /pid\nprintf('%d', getppid())",  # octave-cli runs under octave_kernel
    "# GET /state\nprintf('%d', INIT_RUNS)",
    "# GET /nothing\nunused = 1;",
    "# GET /exit\nkill(getppid(), 9)",
    "# DELETE /items/:id\nreq = jsondecode(REQUEST);\nprintf('deleted %s', req.path.id)",
    "% GET /percent\nprintf('percent')",
    "# GET /quit\nexit(3)",  # octave_kernel then stays up, answering nothing ever again
    "# GET /echoed\nshown = 42",
]

JAVASCRIPT = [
    "MD:# JavaScript endpoints\nThe same endpoints as every lang_* notebook. Kernel Gateway "
    "needs `--NotebookHTTPPersonality.comment_prefix javascript=//` for this notebook.",
    "var INIT_RUNS = (typeof INIT_RUNS === 'undefined' ? 0 : INIT_RUNS) + 1;\nvar HITS = 0;",
    "// GET /echo\nprocess.stdout.write(REQUEST);",
    "// POST /echo\nprocess.stdout.write(REQUEST);",
    "// PUT /echo\nprocess.stdout.write(REQUEST);",
    "// GET /hello/:name\nconst req = JSON.parse(REQUEST);\n"
    "process.stdout.write('hello ' + req.path.name);",
    "// GET /hello/world\nprocess.stdout.write('fixed');",
    "// GET /users/:uid/files/:fid\nprocess.stdout.write(JSON.stringify(JSON.parse(REQUEST).path));",
    "// GET /joined\nvar parts = ['first'];",
    "// GET /joined\nparts.push('second');\nprocess.stdout.write(parts.join('+'));",
    "// POST /created\nHITS += 1;\nprocess.stdout.write(JSON.stringify({hits: HITS}));",
    "// ResponseInfo POST /created\nconsole.log(JSON.stringify({status: 201, headers: "
    "{'Content-Type': 'application/json', 'X-Hits': String(HITS)}}));",
    "// GET /badinfo\nprocess.stdout.write('body');",
    "// ResponseInfo GET /badinfo\nconsole.log('this is not json');",
    "// GET /raise\nconsole.log('lost output');\nthrow new Error('boom \"quoted\"');",
    "// GET /sleep\nconst seconds = Number(JSON.parse(REQUEST).args.s[0]);\n"
    "Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, seconds * 1000);\n"
    "process.stdout.write(String(process.ppid));",
    # ijavascript runs cells in a child process of the kernel process
    "// GET /pid\nprocess.stdout.write(String(process.ppid));",
    "// GET /state\nprocess.stdout.write(String(INIT_RUNS));",
    "// GET /nothing\nconst unused = 1;",
    "// GET /exit\nprocess.kill(process.ppid, 'SIGKILL');",
    "// DELETE /items/:id\nprocess.stdout.write('deleted ' + JSON.parse(REQUEST).path.id);",
    "// GET /result\n1 + 1",
]

write("lang_bash", BASH, language="bash", kernel="bash", display="Bash")
write("lang_r", R, language="R", kernel="ir", display="R")
write("lang_octave", OCTAVE, language="octave", kernel="octave", display="Octave")
write("lang_javascript", JAVASCRIPT, language="javascript", kernel="javascript",
      display="JavaScript (Node.js)")
# Kernel Gateway's default comment syntax for JavaScript is `#` (node cannot parse it there).
write("lang_javascript_hash", [
    "var GREETING = 'hi';",
    "# GET /hash/:name\nconst name = JSON.parse(REQUEST).path.name;\n"
    "process.stdout.write(GREETING + ' ' + name);",
    "# POST /hash\nprocess.stdout.write(JSON.stringify(JSON.parse(REQUEST).body));",
    "# ResponseInfo POST /hash\nconsole.log(JSON.stringify({status: 202}));",
], language="javascript", kernel="javascript", display="JavaScript (Node.js)")
# As in Kernel Gateway's own test suite: metadata naming a language and a kernel that do not
# exist, served with the kernel forced to python3, whose language then decides the binding;
# and a cell with no line break after its annotation, in Python 2.
write("fakelang", ["import json", "# GET /hello\nprint('hello ' + json.loads(REQUEST)['args']"
                   "['name'][0], end='')", "# GET /py2print 'I am Python 2'"],
      language="fakelang", kernel="fakelang2000", display="Fake language")
