"""Runs inside a Python kernel (sent as source at warm-up, never imported by kgpool itself).

It compiles the notebook's endpoint cells once, exactly as IPython would compile them as the
Jupyter channel sends them (the REQUEST binding line first), and serves them on a private Unix
socket. A call runs a cell on the kernel's main thread through the steps of ipykernel's
do_execute and IPython's run_cell that a cell can observe (stdin refused, SIGINT raising, the
pre/post execute and run_cell events with their info objects, the builtin and display traps,
one code object per statement, the display hook with _ and Out, tracebacks, payloads) at the
stack depth an execute_request runs at, and answers with the messages an execute_request would
have published (stream, display_data, update_display_data, clear_output, execute_result,
error) and its execute_reply. stdout is captured by kgpool/_inkernel_io.py, which every Python
kernel gets. Frames are a 4-byte big-endian length and a UTF-8 JSON document.
"""


def _kgpool_probe(n=0):
    """How many more nested Python calls succeed from the caller's frame."""
    try:
        return _kgpool_probe(n + 1)
    except RecursionError:
        return n


def _kgpool_direct_install(path, cells, room):
    """Compile `cells` and serve them on `path`; `room` is _kgpool_probe() measured from the
    module frame of the installing execute_request: calls give user code the same room."""
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

    shell = get_ipython()  # noqa: F821  (a kernel global)
    io = shell.kgpool_io  # installed by _inkernel_io.py; without it there is no direct channel
    kernel = shell.kernel
    top_level_await = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)

    # ----- compiling, once ---------------------------------------------------------------

    class Part:
        """One cell compiled the way run_cell compiles it: one code object per statement."""

        def __init__(self, source, bound):
            if shell.ast_node_interactivity != "last_expr":
                raise ValueError(f"ast_node_interactivity is {shell.ast_node_interactivity!r}")
            self.source, self.bound = source, bound
            cell = shell.transform_cell(source)
            self.transformed = cell
            self.quiet = DisplayHook.semicolon_at_end_of_expression(cell)
            try:
                name = shell.compile.cache(cell, shell.execution_count, raw_code=source)
            except TypeError:  # IPython before 8
                name = shell.compile.cache(cell, shell.execution_count)
            tree = shell.transform_ast(shell.compile.ast_parse(cell, filename=name))
            nodes = tree.body
            if bound:  # the REQUEST binding: a call binds REQUEST as data instead
                first = nodes[0] if nodes else None
                if not (isinstance(first, ast.Assign) and len(first.targets) == 1 and
                        isinstance(first.targets[0], ast.Name) and
                        first.targets[0].id == "REQUEST"):
                    raise ValueError("the cell does not start with the REQUEST binding")
                nodes = nodes[1:]
            last = nodes[-1:] if nodes and isinstance(nodes[-1], ast.Expr) else []
            flags = shell.compile.flags | (top_level_await if shell.autoawait else 0)
            self.codes = [compile(ast.Module([node], []), name, "exec", flags, True)
                          for node in nodes[:len(nodes) - len(last)]]
            self.codes += [compile(ast.Interactive(last), name, "single", flags, True)
                           for _ in last]
            if any(code.co_flags & 0x80 for code in self.codes):  # CO_COROUTINE
                raise SyntaxError("top-level await needs the Jupyter channel")

    compiled, refused = [], {}
    for index, (source, info) in enumerate(cells):
        try:
            compiled.append((Part(source, True), Part(info, False) if info is not None else None))
        except Exception as exc:  # this endpoint stays on the Jupyter channel
            compiled.append(None)
            refused[index] = f"{type(exc).__name__}: {exc}"

    # ----- what the Jupyter channel would have published ---------------------------------

    class Messages:
        """The messages of one call, stdout text merged as ipykernel's buffering would."""

        def __init__(self):
            self.items, self.text = [], []

        def stdout(self, text):
            self.text.append(text)

        def add(self, msg_type, content):
            run = io.current
            if run is not None:
                with run.lock:
                    run.drain()
            self.flush()
            self.items.append([msg_type, content])

        def flush(self):
            if self.text:
                self.items.append(["stream", {"name": "stdout", "text": "".join(self.text)}])
                self.text = []

    class Displays(DisplayPublisher):
        """ipykernel's display publisher, recording instead of sending."""

        def publish(self, data, metadata=None, source=None, *, transient=None, update=False,
                    **kwargs):
            metadata = {} if metadata is None else metadata
            self._validate_data(data, metadata)
            content = {"data": data, "metadata": metadata,
                       "transient": {} if transient is None else transient}
            self.messages.add("update_display_data" if update else "display_data", content)

        def clear_output(self, wait=False):
            self.messages.add("clear_output", {"wait": wait})

    displays = Displays(shell=shell, parent=shell)

    def display_hook(value=None):
        """What ipykernel's display hook does, recording the execute_result it would send."""
        hook = shell.displayhook
        hook.check_for_underscore()
        if value is None or hook.quiet():
            return
        hook.msg = {}  # marks "inside the display hook" for tracebacks, as ipykernel does
        try:
            data, metadata = hook.compute_format_data(value)
            hook.update_user_ns(value)
            hook.fill_exec_result(value)
            if data:
                displays.messages.add("execute_result", {
                    "data": data, "metadata": metadata, "execution_count": hook.prompt_count})
                hook.log_output(data)
        finally:
            hook.msg = None

    def show_traceback(etype, evalue, stb):
        """ipykernel's _showtraceback, recording the error message it would send."""
        content = {"traceback": stb, "ename": str(etype.__name__), "evalue": str(evalue)}
        if getattr(shell.displayhook, "msg", None) is not None:
            shell._last_traceback_during_displayhook = True
        displays.messages.add("error", content)
        shell._last_traceback = stb

    def no_input(prompt=""):
        raise StdinNotImplementedError(
            "raw_input was called, but this frontend does not support input requests.")

    def no_getpass(prompt="", stream=None):
        raise StdinNotImplementedError(
            "getpass was called, but this frontend does not support input requests.")

    # ----- running, per call -------------------------------------------------------------

    def put(obj, name, value):
        """obj.name = value for a trait nothing observes, without traitlets' machinery (a
        few microseconds each, on every call)."""
        notifiers = getattr(obj, "_trait_notifiers", None)
        if notifiers is None or any(notifiers.get(name, {}).values()) or \
                any(notifiers.get(All, {}).values()) or name in obj._trait_validators or \
                hasattr(obj, f"_{name}_validate"):
            setattr(obj, name, value)
        else:
            obj._trait_values[name] = value

    class Info(ExecutionInfo):
        """run_cell's info object; raw_cell (with the request in it) is built when read."""

        raw_cell = property(lambda self: self._raw() if callable(self._raw) else self._raw,
                            lambda self, value: setattr(self, "_raw", value))

    Info.__name__ = Info.__qualname__ = ExecutionInfo.__name__  # what a hook may print
    Info.__module__ = ExecutionInfo.__module__

    def info_for(part, request):
        info = Info(None, False, False, True, None)
        if part.bound:
            head = "REQUEST = " + repr(request) + "\n"  # as languages.bind_request writes it
            info.raw_cell = lambda: head + part.source.split("\n", 1)[-1]
            if hasattr(info, "transformed_cell"):
                info.transformed_cell = head + part.transformed.split("\n", 1)[-1]
        else:
            info.raw_cell = part.source
            if hasattr(info, "transformed_cell"):
                info.transformed_cell = part.transformed
        return info

    def run_code(code, result, ns=None):
        """IPython's run_code for one statement: True if it raised."""
        __tracebackhide__ = "__ipython_bottom__"  # noqa: F841
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

    def run_statements(codes, result, ns=None):
        """IPython's run_ast_nodes loop, with its catch-all around it."""
        try:
            for code in codes:
                if run_code(code, result, ns):
                    return True
        except BaseException:  # e.g. a traceback that failed to render
            result.error_before_exec = sys.exc_info()[1]
            shell.showtraceback()
            return True
        return False

    def padded(depth, function, *args):
        """function(*args) `depth` Python frames deeper: user code gets the recursion room an
        execute_request gives it (RecursionError at the same depth, with the same message)."""
        if depth > 0:
            return padded(depth - 1, function, *args)
        return function(*args)

    def run_cell(part, request):
        info = info_for(part, request)
        result = ExecutionResult(info)
        result.execution_count = shell.execution_count
        try:
            shell.events.trigger("pre_execute")
            shell.events.trigger("pre_run_cell", info)
            with shell.builtin_trap:
                old_hook, sys.displayhook = sys.displayhook, display_hook
                try:
                    put(shell.displayhook, "exec_result", result)
                    if part.bound:
                        shell.user_ns["REQUEST"] = request
                    if depth[0] is None:  # the room a statement has here, unpadded
                        ns = {"probe": _kgpool_probe}
                        padded(0, run_statements, [room_code], result, ns)
                        depth[0] = max(0, ns["ROOM"] - room)
                    raised = padded(depth[0], run_statements, part.codes, result)
                    put(shell, "last_execution_succeeded", not raised)
                    put(shell, "last_execution_result", result)
                    put(shell.displayhook, "exec_result", None)
                finally:
                    sys.displayhook = old_hook
        finally:
            shell.events.trigger("post_execute")
            shell.events.trigger("post_run_cell", result)
        return result

    def execute(part, request):
        """ipykernel's do_execute around run_cell: the execute_reply content."""
        shell._last_traceback = None
        shell._last_traceback_during_displayhook = False
        saved_input, saved_getpass = builtins.input, getpass.getpass
        builtins.input, getpass.getpass = no_input, no_getpass
        if kernel._allow_stdin:
            kernel._allow_stdin = False
        try:
            result = run_cell(part, request)
        finally:
            builtins.input, getpass.getpass = saved_input, saved_getpass
        err = result.error_before_exec if result.error_before_exec is not None \
            else result.error_in_exec
        if result.success and not getattr(shell, "_last_traceback_during_displayhook", False):
            reply = {"status": "ok"}
        else:
            reply = {"status": "error", "traceback": shell._last_traceback or [],
                     "ename": str(type(err).__name__), "evalue": str(err)}
        shell.payload_manager.clear_payload()
        return reply

    def call(part, request):
        """{"m": the messages, "r": the execute_reply, or None where ipykernel sends none}."""
        messages = displays.messages = Messages()
        saved = (shell.display_pub, shell.__dict__.get("_showtraceback"))
        shell.display_pub, shell._showtraceback = displays, show_traceback
        sigint = _signal.signal(_signal.SIGINT, _signal.default_int_handler)
        io.begin(messages.stdout, part.source, part.quiet)
        reply = None
        try:
            reply = execute(part, request)
        except BaseException:  # ipykernel's handler failed: it sends no reply either
            traceback.print_exc(file=sys.__stderr__)
        finally:
            io.end()
            _signal.signal(_signal.SIGINT, sigint)
            shell.display_pub = saved[0]
            if saved[1] is None:
                del shell._showtraceback
            else:
                shell._showtraceback = saved[1]
        messages.flush()
        return {"m": messages.items, "r": reply}

    # how many frames deeper a call runs user code, measured on the first call
    depth = [None]
    room_code = compile("ROOM = probe()", "<kgpool>", "exec")

    def answer(data):
        try:
            return json_packer(data)
        except (TypeError, ValueError):  # e.g. lone surrogates: escaped instead
            return json.dumps(data, default=str).encode("ascii")

    async def serve(reader, writer):
        try:
            while True:
                size = struct.unpack(">I", await reader.readexactly(4))[0]
                request = json.loads(await reader.readexactly(size))
                part, info = compiled[request["e"]]
                reply = {"c": call(part, request["r"])}
                ok = reply["c"]["r"] is not None and reply["c"]["r"]["status"] == "ok" and \
                    not any(msg_type == "error" for msg_type, _ in reply["c"]["m"])
                if ok and info is not None:
                    reply["i"] = call(info, None)
                payload = answer(reply)
                writer.write(struct.pack(">I", len(payload)) + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # kgpool closed the channel
        finally:  # on any other failure too: kgpool sees the channel close, never a hang
            writer.close()

    # Bound and listening now; accepting starts when this cell returns to the kernel's loop.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    shell.kgpool_direct_server = asyncio.ensure_future(
        asyncio.start_unix_server(serve, sock=listener))
    return refused
