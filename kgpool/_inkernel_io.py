"""Runs inside every Python kernel (sent as source at warm-up, never imported by kgpool itself).

Where a cell's stdout goes, the same way for both channels. During each execution (an
execute_request, or a call on the direct channel) file descriptor 1 is a fresh in-memory file,
so what os.system, subprocesses, C extensions and os.write(1) write lands in that execution's
stdout, in order with print(). Output from threads that were already running when the execution
began is dropped, and so is stdout that belongs to no execution (ipykernel's echo of fd 1 to the
kernel's own stdout, i.e. kgpool's log, goes to /dev/null). A trailing ';' silences the value
although kgpool runs cells with store_history=False (IPython looks for it in the history). The
source is run in a namespace of its own: these names never reach the user's globals.
"""

import codecs
import ctypes
import functools
import os
import sys
import threading

from IPython.core.displayhook import DisplayHook

_MAX_HELD = 16  # files of finished executions kept for processes that still write to them


def _memfd():
    if hasattr(os, "memfd_create"):
        return os.memfd_create("kgpool-stdout", os.MFD_CLOEXEC)
    import tempfile
    with tempfile.TemporaryFile() as file:
        return os.dup(file.fileno())


def _c_flush():
    """fflush(NULL): C stdio buffers belong to the execution that filled them."""
    try:
        fflush = ctypes.CDLL(None).fflush
        fflush.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError):
        return lambda: None
    return lambda: fflush(None)


class _Execution:
    """One execution's stdout: print() text and fd-1 bytes, in the order they were written."""

    def __init__(self, output, sink, cell, quiet):
        self.sink, self.cell, self.quiet = sink, cell, quiet
        self.old = frozenset(threading.enumerate())  # threads running before it began
        self.lock = output.lock  # threads it starts write too
        self.fd = _memfd()
        self.pos = 0
        self.decoder = None  # made when fd 1 is written to
        os.dup2(self.fd, 1)

    def put(self, text):
        with self.lock:
            self.drain()
            self.sink(text)

    def drain(self):
        end = os.lseek(self.fd, 0, os.SEEK_CUR)  # writers share this offset
        while self.pos < end:
            data = os.pread(self.fd, min(end - self.pos, 1 << 20), self.pos)
            if not data:
                break
            self.pos += len(data)
            if self.decoder is None:  # UTF-8 with replacement characters, as ipykernel does
                self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
            text = self.decoder.decode(data)
            if text:
                self.sink(text)

    def finish(self, outside, c_flush):
        c_flush()
        if sys.__stdout__ is not None:
            try:
                sys.__stdout__.flush()
            except (OSError, ValueError):
                pass
        with self.lock:
            self.drain()
            tail = self.decoder.decode(b"", final=True) if self.decoder else ""
            if tail:
                self.sink(tail)
        os.dup2(outside, 1)


class _Output:
    """The kernel's stdout policy; `current` is the execution running now, if any."""

    def __init__(self, shell, stream):
        self.shell, self.current, self.forked = shell, None, False
        self.write = type(stream).write.__get__(stream)  # ipykernel's own
        self.flush = type(stream).flush.__get__(stream)
        self.main, self.lock, self.c_flush = threading.main_thread(), threading.Lock(), _c_flush()
        self.held = []  # (fd, size) of finished executions a leftover process may write to
        null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        echo = getattr(stream, "_original_stdstream_copy", None)
        if getattr(stream, "_should_watch", False) and echo is not None:
            os.dup2(null, echo, inheritable=False)  # ipykernel copies fd 1 there: kgpool's log
        else:
            os.dup2(null, 1)  # nothing watches fd 1: between executions it goes nowhere
        os.close(null)
        self.outside = os.dup(1)  # what fd 1 is between executions

    def begin(self, sink, cell=None, quiet=None):
        self.current = _Execution(self, sink, cell, quiet)
        return self.current

    def end(self):
        run, self.current = self.current, None
        if run is None:
            return
        try:
            run.finish(self.outside, self.c_flush)
        finally:
            self.retire(run.fd, run.pos)
            # IPython keeps each execution's stream output and values per execution count for
            # %history -o; with store_history=False the count never moves: they would only grow
            outputs = getattr(self.shell.history_manager, "outputs", None)
            if isinstance(outputs, dict):
                outputs.pop(self.shell.execution_count, None)  # run_cell's tee of the streams
                outputs.pop(self.shell.execution_count - 1, None)  # the display hook's values

    def retire(self, fd, size):
        """Keep a finished execution's file one execution longer: if it grew meanwhile, a
        process it started still writes there, so it is emptied from then on (bounded memory)
        instead of closed; the rest are closed."""
        kept = []
        for old, at in self.held:
            if at < 0 or os.lseek(old, 0, os.SEEK_CUR) != at:
                os.ftruncate(old, 0)
                kept.append((old, -1))
            else:
                os.close(old)
        os.ftruncate(fd, 0)  # its output was read: free the memory now (the offset stays)
        kept.append((fd, size))
        while len(kept) > _MAX_HELD:
            os.close(kept.pop(0)[0])
        self.held = kept

    def allowed(self, run):
        thread = threading.current_thread()
        return thread is self.main or (run is not None and thread not in run.old)

    # what the stream's write and flush become
    def stream_write(self, stream, text):
        if self.forked:  # a forked child: fd 1 is still the execution's file, if any
            if not isinstance(text, str):
                return self.write(text)  # ipykernel's TypeError
            os.write(1, text.encode("utf-8", "replace"))
            return len(text)
        run = self.current
        if not self.allowed(run):
            return len(text) if isinstance(text, str) else self.write(text)
        if run is None or not isinstance(text, str):
            return self.write(text)
        run.put(text)
        return len(text)

    def stream_flush(self, stream):
        run = self.current
        if self.forked:
            return None
        if run is not None and self.allowed(run):
            with run.lock:
                run.drain()
        if run is None or run.sink is self.write:
            return self.flush()
        return None  # a direct call: nothing of it waits in ipykernel's buffers

    def quiet(self, original):
        """DisplayHook.quiet: does the *running* cell end with ';'."""
        run = self.current
        if run is None:
            return original()
        if run.quiet is None:
            try:
                cell = self.shell.transform_cell(run.cell or "")
                run.quiet = DisplayHook.semicolon_at_end_of_expression(cell)
            except Exception:
                run.quiet = False
        return run.quiet


class _Method:
    """A data descriptor, so that it stays in force when something assigns stream.write
    (IPython's run_cell tees the stream that way, and restores what it found)."""

    def __init__(self, function, original):
        self.function, self.original = function, original
        self.key = "_kgpool_" + original.__name__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        return obj.__dict__.get(self.key) or self.function.__get__(obj, cls)

    def __set__(self, obj, value):
        if getattr(value, "__func__", None) is self.original:  # "put back ipykernel's"
            obj.__dict__.pop(self.key, None)
        else:
            obj.__dict__[self.key] = value

    def __delete__(self, obj):
        obj.__dict__.pop(self.key, None)


def _hook_stream(stream, output):
    """Route the stream's write and flush through `output`, keeping its class for isinstance."""
    base = type(stream)
    hooked = type(base.__name__, (base,), {
        "__module__": base.__module__, "__qualname__": base.__qualname__,
        "write": _Method(lambda self, text: output.stream_write(self, text), base.write),
        "flush": _Method(lambda self: output.stream_flush(self), base.flush)})
    stream.__dict__.pop("write", None)
    stream.__dict__.pop("flush", None)
    stream.__class__ = hooked


def _hook_executions(kernel, output):
    """An execute_request is an execution too: wrap ipykernel's do_execute. kgpool's own
    requests carry REQUEST (or a batch's REQUESTS) in their metadata: bound as data before the
    cell runs, so the cell's code is the notebook's, line for line."""
    do_execute = getattr(kernel, "do_execute", None)
    if do_execute is None:
        return
    shell = output.shell

    @functools.wraps(do_execute)
    async def execute(*args, **kwargs):
        parent = kernel.get_parent("shell") if hasattr(kernel, "get_parent") else {}
        metadata = parent.get("metadata") or {}
        if "kgpool_request" in metadata:
            shell.user_ns["REQUEST"] = metadata["kgpool_request"]
        elif "kgpool_requests" in metadata:
            shell.user_ns["REQUESTS"] = list(metadata["kgpool_requests"])
            shell.user_ns["RESPONSES"] = None
        if output.current is not None:
            return await do_execute(*args, **kwargs)
        sink = output.write
        if metadata.get("kgpool_stream"):  # kgpool streams the answer:
            def sink(text):  # what is printed is sent at once, not every 0.2 s
                output.write(text)
                output.flush()
        output.begin(sink, kwargs.get("code", args[0] if args else ""))
        try:
            return await do_execute(*args, **kwargs)
        finally:
            output.end()

    kernel.do_execute = execute


def _body(value):
    if isinstance(value, (bytes, bytearray)):
        import base64
        return {"b64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, str):
        return {"text": value}
    import json
    return {"json": json.dumps(value, default=str)}


def _answer(item):
    """One item of RESPONSES: a body (str, bytes, anything JSON can write), a response
    {"status": int, "headers": {...}, "body": ...}, or an exception (that request's 500)."""
    if isinstance(item, BaseException):
        return {"error": [type(item).__name__, str(item)]}
    if isinstance(item, dict) and item and set(item) <= {"status", "headers", "body"} and \
            ("body" in item or isinstance(item.get("status"), int)):
        out = {key: item[key] for key in ("status", "headers") if key in item}
        out["body"] = _body(item.get("body", ""))
        return out
    return {"body": _body(item)}


def _responses(shell):
    """What a batched cell answered in RESPONSES, encoded; None if it set none."""
    value = shell.user_ns.get("RESPONSES")
    if value is None:
        return None
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        return {"invalid": f"RESPONSES is a {type(value).__name__}, not a list"}
    return [_answer(item) for item in value]


def _cell_key(shell, source):
    """A cell as the compiler caches it (transformed, line by line): how a traceback's frame
    finds which notebook cell it is in."""
    try:
        text = shell.transform_cell(source)
    except Exception:
        text = source
    return "".join(line + "\n" for line in text.splitlines())


def _label_cells(shell):
    """Tracebacks name notebook cells as a notebook user counts them ("Cell 4 ('# GET /x'),
    line 3") instead of "Cell In[1]": shell.kgpool_label_cells({source: label}) says which."""
    import linecache
    compiler = shell.compile
    original = compiler.format_code_name
    labels = {}

    def format_code_name(name):
        entry = linecache.cache.get(name) if labels else None
        label = labels.get("".join(entry[2])) if entry and len(entry) > 2 else None
        return ("Cell", label) if label else original(name)

    def add(mapping):
        labels.update({_cell_key(shell, source): label for source, label in mapping.items()})

    compiler.format_code_name = format_code_name
    shell.kgpool_label_cells = add


def _kgpool_io_install():
    shell = get_ipython()  # noqa: F821  (a kernel global)
    _label_cells(shell)
    output = _Output(shell, sys.stdout)
    shell.kgpool_responses_of = _responses  # the direct channel's runner uses it too
    shell.kgpool_responses = lambda: __import__("json").dumps(_responses(shell))

    def forked():
        output.forked = True

    os.register_at_fork(after_in_child=forked)
    _hook_stream(sys.stdout, output)
    shell.displayhook.quiet = functools.partial(output.quiet, shell.displayhook.quiet)
    _hook_executions(getattr(shell, "kernel", None), output)
    shell.kgpool_io = output
