"""Runs inside a Python kernel (sent as source at warm-up, never imported by kgpool itself).

It compiles the notebook's endpoint cells once, the way IPython would run them, and serves them
on a private Unix socket: each call binds REQUEST as data, runs the cell on the kernel's main
thread, and answers with what an execute_request would have produced (stdout, the result bundle,
the error). Frames are a 4-byte big-endian length and a UTF-8 JSON document.
"""




def _kgpool_direct_install(path, cells):
    import ast
    import asyncio
    import base64
    import builtins
    import json
    import linecache
    import socket
    import struct

    from IPython.core.displayhook import DisplayHook
    from IPython.core.error import StdinNotImplementedError
    from IPython.utils.capture import capture_output

    shell = get_ipython()  # noqa: F821  (a kernel global)
    top_level_await = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)

    def compile_cell(source, name):
        if source is None:
            return None
        cell = shell.transform_cell(source)
        try:  # registers the source in linecache, so tracebacks show the cell's lines
            name = shell.compile.cache(cell)
        except Exception:
            linecache.cache[name] = (len(cell), None, cell.splitlines(True), name)
        tree = shell.transform_ast(ast.parse(cell, filename=name))
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr) and \
                not DisplayHook.semicolon_at_end_of_expression(cell):
            last = ast.Expression(tree.body.pop().value)
        body = compile(ast.Module(tree.body, type_ignores=[]), name, "exec",
                       flags=top_level_await, dont_inherit=True)
        tail = compile(last, name, "eval", flags=top_level_await, dont_inherit=True) \
            if last is not None else None
        if any(code is not None and code.co_flags & 0x80 for code in (body, tail)):
            raise SyntaxError("top-level await needs the Jupyter channel")
        return body, tail

    compiled, refused = [], {}
    for index, (source, info) in enumerate(cells):
        try:
            compiled.append((compile_cell(source, f"<endpoint {index}>"),
                             compile_cell(info, f"<response info {index}>")))
        except Exception as exc:  # this endpoint stays on the Jupyter channel
            compiled.append(None)
            refused[index] = f"{type(exc).__name__}: {exc}"

    def jsonable(value):
        return base64.b64encode(value).decode("ascii") if isinstance(value, bytes) else value

    def no_input(*args, **kwargs):
        raise StdinNotImplementedError(
            "raw_input was called, but this frontend does not support input requests.")

    def run(code):
        """[stdout, result bundle or None, [ename, evalue] or None, display bundles]."""
        body, tail = code
        ns = shell.user_ns
        saved = builtins.input
        builtins.input = no_input
        value, error = None, None
        with capture_output(stdout=True, stderr=False, display=True) as captured:
            try:
                shell.events.trigger("pre_execute")
                exec(body, ns)
                if tail is not None:
                    value = eval(tail, ns)
            except BaseException as exc:  # what IPython would report, KeyboardInterrupt too
                try:
                    trace = shell.InteractiveTB.structured_traceback(
                        type(exc), exc, exc.__traceback__, tb_offset=1)
                except Exception:
                    trace = []
                error = [type(exc).__name__, str(exc), trace]
            finally:
                builtins.input = saved
                try:
                    shell.events.trigger("post_execute")
                except Exception:
                    pass
        result = None
        if error is None and value is not None:
            data, _ = shell.display_formatter.format(value)
            result = {mime: jsonable(item) for mime, item in data.items()}
        displays = [{mime: jsonable(item) for mime, item in output.data.items()}
                    for output in captured.outputs]
        return [captured.stdout, result, error, displays]

    async def serve(reader, writer):
        try:
            while True:
                size = struct.unpack(">I", await reader.readexactly(4))[0]
                call = json.loads(await reader.readexactly(size))
                shell.user_ns["REQUEST"] = call["r"]
                code, info = compiled[call["e"]]
                reply = {"c": run(code)}
                if reply["c"][2] is None and info is not None:
                    reply["i"] = run(info)
                payload = json.dumps(reply, default=lambda o: jsonable(o) if isinstance(
                    o, bytes) else str(o)).encode("utf-8", "surrogateescape")
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
