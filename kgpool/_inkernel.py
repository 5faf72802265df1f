"""Runs inside a Python kernel (sent as source at warm-up, never imported by kgpool itself).

It compiles the notebook's endpoint cells once, exactly as IPython compiles what the Jupyter
channel sends (the REQUEST binding line first), and serves them on a private Unix socket. A call
runs a cell on the kernel's main thread through the steps of ipykernel's do_execute and
IPython's run_cell that a cell can observe (stdin refused, SIGINT raising, the pre/post execute
and run_cell events with their info objects, the builtin and display traps, one code object per
statement, the display hook with _ and Out, tracebacks, payloads) with the recursion room an
execute_request leaves, and answers with the messages an execute_request would have published
(stream, display_data, update_display_data, clear_output, execute_result, error) and its
execute_reply. stdout is captured by _inkernel_io.py, which every Python kernel gets. Frames are
a 4-byte big-endian length and a UTF-8 JSON document. The source is run in a namespace of its
own: these names never reach the user's globals.
"""

import _signal  # signal.signal without its enum conversions: microseconds per call
import ast
import asyncio
import bdb
import builtins
import getpass
import json
import socket
import struct
import sys
import traceback
import warnings

from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher
from IPython.core.error import StdinNotImplementedError
from IPython.core.interactiveshell import ExecutionInfo, ExecutionResult
from jupyter_client.session import json_packer
from traitlets import All

_TOP_LEVEL_AWAIT = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)
_CO_COROUTINE = 0x80


def _kgpool_probe(n=0):
    """How many more nested Python calls succeed from the caller's frame."""
    try:
        return _kgpool_probe(n + 1)
    except RecursionError:
        return n


class _Part:
    """One cell compiled the way run_cell compiles it: one code object per statement."""

    def __init__(self, shell, source, bound):
        if shell.ast_node_interactivity != "last_expr":
            raise ValueError(f"ast_node_interactivity is {shell.ast_node_interactivity!r}")
        self.source, self.bound = source, bound
        cell = self.transformed = shell.transform_cell(source)
        self.quiet = DisplayHook.semicolon_at_end_of_expression(cell)
        try:
            name = shell.compile.cache(cell, shell.execution_count, raw_code=source)
        except TypeError:  # IPython before 8
            name = shell.compile.cache(cell, shell.execution_count)
        # REQUEST (or a batch's REQUESTS) is bound as data by each call (`bound`), as kgpool's
        # execute_requests bind it from their metadata: the code is the cell's, line for line
        nodes = shell.transform_ast(shell.compile.ast_parse(cell, filename=name)).body
        last = nodes[-1:] if nodes and isinstance(nodes[-1], ast.Expr) else []
        flags = shell.compile.flags | (_TOP_LEVEL_AWAIT if shell.autoawait else 0)
        self.codes = [compile(ast.Module([node], []), name, "exec", flags, True)
                      for node in nodes[:len(nodes) - len(last)]]
        self.codes += [compile(ast.Interactive(last), name, "single", flags, True)
                       for _ in last]
        if any(code.co_flags & _CO_COROUTINE for code in self.codes):
            raise SyntaxError("top-level await needs the Jupyter channel")


class _Info(ExecutionInfo):
    """run_cell's info object; raw_cell and transformed_cell (with the request in them) are
    built when read."""

    def _text(name):
        def get(self):
            value = self.__dict__.get(name)
            return value() if callable(value) else value
        return property(get, lambda self, value: self.__dict__.__setitem__(name, value))

    raw_cell = _text("raw_cell")  # type: ignore[arg-type]
    transformed_cell = _text("transformed_cell")  # type: ignore[arg-type]
    del _text


_Info.__name__ = _Info.__qualname__ = ExecutionInfo.__name__  # what a hook may print
_Info.__module__ = ExecutionInfo.__module__


def _info(part, request, batch=None):
    info = _Info(None, False, False, True, None)
    info.raw_cell, info.transformed_cell = part.source, part.transformed
    return info


_VALIDATED: dict = {}  # type: ignore[type-arg]  # (class, trait name): whether a _<name>_validate method exists


def _put(obj, name, value):
    """obj.name = value for a trait that nothing observes or validates, without traitlets'
    machinery (a few microseconds each, on every call)."""
    notifiers = getattr(obj, "_trait_notifiers", None)
    key = (type(obj), name)
    if key not in _VALIDATED:
        _VALIDATED[key] = hasattr(obj, f"_{name}_validate")
    if notifiers is None or _VALIDATED[key] or name in obj._trait_validators or \
            any(notifiers.get(name, {}).values()) or any(notifiers.get(All, {}).values()):
        setattr(obj, name, value)
    else:
        obj._trait_values[name] = value


def _no_input(prompt=""):
    raise StdinNotImplementedError(
        "raw_input was called, but this frontend does not support input requests.")


def _no_getpass(prompt="", stream=None):
    raise StdinNotImplementedError(
        "getpass was called, but this frontend does not support input requests.")


class _Messages:
    """The messages of one call, stdout text merged as ipykernel's buffering would; with
    `send`, every message goes out at once (a streamed answer) instead of with the reply."""

    def __init__(self, io, send=None):
        self.io, self.items, self.text, self.send = io, [], [], send

    def stdout(self, text):
        self.text.append(text)
        if self.send is not None:
            self.flush()

    def add(self, msg_type, content):
        run = self.io.current
        if run is not None:  # fd-1 output written before this message comes first
            with run.lock:
                run.drain()
        self.flush()
        self.put([msg_type, content])

    def flush(self):
        if self.text:
            self.put(["stream", {"name": "stdout", "text": "".join(self.text)}])
            self.text = []

    def put(self, message):
        if self.send is not None:
            self.send(message)
        else:
            self.items.append(message)


class _Displays(DisplayPublisher):
    """ipykernel's display publisher, recording instead of sending."""

    messages = None

    def publish(self, data, metadata=None, source=None, *, transient=None, update=False,
                **kwargs):
        metadata = {} if metadata is None else metadata
        self._validate_data(data, metadata)
        content = {"data": data, "metadata": metadata,
                   "transient": {} if transient is None else transient}
        self.messages.add("update_display_data" if update else "display_data", content)

    def clear_output(self, wait=False):
        self.messages.add("clear_output", {"wait": wait})


class _Runner:
    """Runs a _Part as ipykernel's execute_request would, recording what it would publish."""

    def __init__(self, shell, room):
        self.shell, self.io, self.kernel = shell, shell.kgpool_io, shell.kernel
        self.displays = _Displays(shell=shell, parent=shell)
        self.room, self.depth = room, None  # depth: frames to pad, measured on the first call
        self.room_code = compile("ROOM = probe()", "<kgpool>", "exec")

    def call(self, part, request, batch=None, send=None):
        """{"m": the messages, "r": the execute_reply, or None where ipykernel sends none};
        with `batch` (a list of REQUESTs) "R" too: the RESPONSES it set, encoded. `send` gets
        each message as it is published (a streamed call)."""
        shell = self.shell
        self.batch = batch
        messages = self.displays.messages = _Messages(self.io, send)
        saved = shell.display_pub, shell.__dict__.get("_showtraceback")
        shell.display_pub, shell._showtraceback = self.displays, self.show_traceback
        sigint = _signal.signal(_signal.SIGINT, _signal.default_int_handler)
        self.io.begin(messages.stdout, part.source, part.quiet)
        reply = None
        try:
            reply = self.execute(part, request)
        except BaseException:  # ipykernel's handler failed: it sends no reply either
            traceback.print_exc(file=sys.__stderr__)
        finally:
            self.io.end()
            _signal.signal(_signal.SIGINT, sigint)
            shell.display_pub = saved[0]
            shell.__dict__.pop("_showtraceback", None)
            if saved[1] is not None:
                shell._showtraceback = saved[1]
        messages.flush()
        answer = {"m": messages.items, "r": reply}
        if batch is not None:
            answer["R"] = shell.kgpool_responses_of(shell)  # _inkernel_io.py's encoding
        return answer

    def execute(self, part, request):
        """ipykernel's do_execute around run_cell: the execute_reply content."""
        shell = self.shell
        shell._last_traceback = None
        shell._last_traceback_during_displayhook = False
        saved = builtins.input, getpass.getpass
        builtins.input, getpass.getpass = _no_input, _no_getpass
        if self.kernel._allow_stdin:
            self.kernel._allow_stdin = False
        try:
            result = self.run_cell(part, request)
        finally:
            builtins.input, getpass.getpass = saved
        err = result.error_before_exec if result.error_before_exec is not None \
            else result.error_in_exec
        if result.success and not getattr(shell, "_last_traceback_during_displayhook", False):
            reply = {"status": "ok"}
        else:
            reply = {"status": "error", "traceback": shell._last_traceback or [],
                     "ename": str(type(err).__name__), "evalue": str(err)}
        shell.payload_manager.clear_payload()
        return reply

    def run_cell(self, part, request):
        shell = self.shell
        info = _info(part, request, self.batch)
        result = ExecutionResult(info)
        result.execution_count = shell.execution_count
        try:
            shell.events.trigger("pre_execute")
            shell.events.trigger("pre_run_cell", info)
            with shell.builtin_trap:
                old_hook, sys.displayhook = sys.displayhook, self.display_hook
                try:
                    _put(shell.displayhook, "exec_result", result)
                    if part.bound and self.batch is not None:
                        shell.user_ns["REQUESTS"] = list(self.batch)
                        shell.user_ns["RESPONSES"] = None
                    elif part.bound:
                        shell.user_ns["REQUEST"] = request
                    if self.depth is None:  # the room a statement has here, unpadded
                        ns = {"probe": _kgpool_probe}
                        self.padded(0, self.run_statements, [self.room_code], result, ns)
                        self.depth = max(0, ns["ROOM"] - self.room)
                    raised = self.padded(self.depth, self.run_statements, part.codes, result)
                    _put(shell, "last_execution_succeeded", not raised)
                    _put(shell, "last_execution_result", result)
                    _put(shell.displayhook, "exec_result", None)
                finally:
                    sys.displayhook = old_hook
        finally:
            shell.events.trigger("post_execute")
            shell.events.trigger("post_run_cell", result)
        return result

    def padded(self, depth, function, *args):
        """function(*args) `depth` Python frames deeper: user code gets the recursion room an
        execute_request gives it (RecursionError at the same depth, with the same message)."""
        if depth > 0:
            return self.padded(depth - 1, function, *args)
        return function(*args)

    def run_statements(self, codes, result, ns=None):
        """IPython's run_ast_nodes loop, with its catch-all around it: True if one raised."""
        try:
            for code in codes:
                if self.run_code(code, result, ns):
                    return True
        except BaseException:  # e.g. a traceback that failed to render
            result.error_before_exec = sys.exc_info()[1]
            self.shell.showtraceback()
            return True
        return False

    def run_code(self, code, result, ns=None):
        """IPython's run_code for one statement: True if it raised."""
        __tracebackhide__ = "__ipython_bottom__"  # noqa: F841
        shell = self.shell
        old_excepthook, sys.excepthook = sys.excepthook, shell.excepthook
        shell.sys_excepthook = old_excepthook
        try:
            try:
                if ns is None:
                    exec(code, shell.user_global_ns, shell.user_ns)
                else:
                    exec(code, ns)
            finally:
                sys.excepthook = old_excepthook
        except SystemExit as exc:
            result.error_in_exec = exc
            shell.showtraceback(exception_only=True)
            warnings.warn("To exit: use 'exit', 'quit', or Ctrl-D.", stacklevel=1)
        except bdb.BdbQuit:
            result.error_in_exec = sys.exc_info()[1]
        except shell.custom_exceptions:
            etype, value, tb = sys.exc_info()
            result.error_in_exec = value
            shell.CustomTB(etype, value, tb)
        except BaseException:  # what run_code catches: KeyboardInterrupt too
            result.error_in_exec = sys.exc_info()[1]
            shell.showtraceback(running_compiled_code=True)
        else:
            return False
        return True

    def display_hook(self, value=None):
        """What ipykernel's display hook does, recording the execute_result it would send."""
        hook = self.shell.displayhook
        hook.check_for_underscore()
        if value is None or hook.quiet():
            return
        hook.msg = {}  # marks "inside the display hook" for tracebacks, as ipykernel does
        try:
            data, metadata = hook.compute_format_data(value)
            hook.update_user_ns(value)
            hook.fill_exec_result(value)
            if data:
                self.displays.messages.add("execute_result", {
                    "data": data, "metadata": metadata, "execution_count": hook.prompt_count})
                hook.log_output(data)
        finally:
            hook.msg = None

    def show_traceback(self, etype, evalue, stb):
        """ipykernel's _showtraceback, recording the error message it would send."""
        shell = self.shell
        content = {"traceback": stb, "ename": str(etype.__name__), "evalue": str(evalue)}
        if getattr(shell.displayhook, "msg", None) is not None:
            shell._last_traceback_during_displayhook = True
        self.displays.messages.add("error", content)
        shell._last_traceback = stb


def _answer(data):
    try:
        return json_packer(data)  # what ipykernel would have put on the wire
    except (TypeError, ValueError):  # e.g. lone surrogates: escaped instead
        return json.dumps(data, default=str).encode("ascii")


def _send(writer, data):
    payload = _answer(data)
    writer.write(struct.pack(">I", len(payload)) + payload)


def _failed(part):
    return part["r"] is None or part["r"]["status"] != "ok" or \
        any(msg_type == "error" for msg_type, _ in part["m"])


def _server(runner, compiled):
    async def serve(reader, writer):
        try:
            while True:
                size = struct.unpack(">I", await reader.readexactly(4))[0]
                request = json.loads(await reader.readexactly(size))
                part, info = compiled[request["e"]]
                if request.get("s"):  # streamed: ResponseInfo first, then each message
                    if info is not None:
                        _send(writer, {"h": runner.call(info, None)})

                    def send(message):
                        _send(writer, {"p": message})
                    _send(writer, {"c": runner.call(part, request["r"], send=send)})
                    await writer.drain()
                    continue
                reply = {"c": runner.call(part, request.get("r"), request.get("b"))}
                if info is not None and not _failed(reply["c"]):
                    reply["i"] = runner.call(info, None)
                _send(writer, reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # kgpool closed the channel
        finally:  # on any other failure too: kgpool sees the channel close, never a hang
            writer.close()
    return serve


def _kgpool_direct_install(path, cells, room):
    """Compile `cells` and serve them on `path`; `room` is _kgpool_probe() measured from the
    module frame of the installing execute_request. Returns {index: why} of the endpoints
    that stay on the Jupyter channel."""
    shell = get_ipython()  # noqa: F821  (a kernel global)
    compiled, refused = [], {}
    for index, (source, info) in enumerate(cells):
        try:
            compiled.append((_Part(shell, source, True),
                             _Part(shell, info, False) if info is not None else None))
        except Exception as exc:  # this endpoint stays on the Jupyter channel
            compiled.append(None)
            refused[index] = f"{type(exc).__name__}: {exc}"
    runner = _Runner(shell, room)  # needs _inkernel_io.py's shell.kgpool_io
    if not path:  # a --fork template: each forked worker serves these (_inkernel_fork.py)
        shell.kgpool_direct_parts = runner, compiled, _server
        return refused
    # Bound and listening now; accepting starts when this cell returns to the kernel's loop.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    shell.kgpool_direct_server = asyncio.ensure_future(
        asyncio.start_unix_server(_server(runner, compiled), sock=listener))
    return refused
