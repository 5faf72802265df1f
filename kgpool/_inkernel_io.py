"""Runs inside every Python kernel (sent as source at warm-up, never imported by kgpool itself).

Where a cell's stdout goes, the same way for both channels. During each execution (an
execute_request, or a call on the direct channel) file descriptor 1 is a fresh in-memory file,
so what os.system, subprocesses, C extensions and os.write(1) write lands in that execution's
stdout, in order with print(). Output from threads that were already running when the execution
began is dropped, and so is stdout that belongs to no execution (ipykernel's echo of fd 1 to the
kernel's own stdout, i.e. kgpool's log, goes to /dev/null). A trailing ';' silences the value
although kgpool runs cells with store_history=False (IPython looks for it in the history).
"""


def _kgpool_io_install():
    import codecs
    import ctypes
    import functools
    import os
    import sys
    import threading

    from IPython.core.displayhook import DisplayHook

    shell = get_ipython()  # noqa: F821  (a kernel global)
    stream = sys.stdout
    write = type(stream).write.__get__(stream)  # ipykernel's own
    flush = type(stream).flush.__get__(stream)
    main = threading.main_thread()
    try:
        fflush = ctypes.CDLL(None).fflush  # C stdio buffers belong to the execution too
        fflush.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError):
        fflush = None

    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    echo = getattr(stream, "_original_stdstream_copy", None)
    if getattr(stream, "_should_watch", False) and echo is not None:
        os.dup2(null, echo, inheritable=False)  # ipykernel copies fd 1 there: kgpool's stdout
    else:
        os.dup2(null, 1)  # nothing watches fd 1: between executions it goes nowhere
    os.close(null)
    outside = os.dup(1)  # what fd 1 is between executions
    lock = threading.Lock()

    def memfd():
        if hasattr(os, "memfd_create"):
            return os.memfd_create("kgpool-stdout", os.MFD_CLOEXEC)
        import tempfile
        with tempfile.TemporaryFile() as file:
            return os.dup(file.fileno())

    class Execution:
        """One execution's stdout: print() text and fd-1 bytes, in the order they were written."""

        def __init__(self, sink, cell, quiet):
            self.sink, self.cell, self.quiet = sink, cell, quiet
            self.old = frozenset(threading.enumerate())  # threads running before it began
            self.lock = lock  # threads it starts write too
            self.fd = memfd()
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
                if self.decoder is None:
                    self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
                text = self.decoder.decode(data)
                if text:
                    self.sink(text)

        def finish(self):
            if fflush is not None:
                fflush(None)
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

    class Output:
        """The kernel's stdout policy; `current` is the execution running now, if any."""

        def __init__(self):
            self.current = None
            self.forked = False
            self.held = []  # (fd, size) of finished executions a leftover process may write to

        def begin(self, sink, cell=None, quiet=None):
            self.current = Execution(sink, cell, quiet)
            return self.current

        def end(self):
            run, self.current = self.current, None
            if run is None:
                return
            try:
                run.finish()
            finally:
                self.retire(run.fd, run.pos)
                # IPython keeps each execution's stream output and values per execution count
                # for %history -o; with store_history=False the count never moves and the
                # lists would only grow
                outputs = getattr(shell.history_manager, "outputs", None)
                if isinstance(outputs, dict):
                    outputs.pop(shell.execution_count, None)  # run_cell's tee of the streams
                    outputs.pop(shell.execution_count - 1, None)  # the display hook's values

        def retire(self, fd, size):
            """Keep a finished execution's file one execution longer: if it grew meanwhile, a
            process it started still writes there, so it is emptied from then on (bounded
            memory) instead of closed; the rest are closed."""
            kept = []
            for old, at in self.held:
                grew = os.lseek(old, 0, os.SEEK_CUR) != at
                if grew or at < 0:
                    os.ftruncate(old, 0)
                    kept.append((old, -1))
                else:
                    os.close(old)
            os.ftruncate(fd, 0)  # its output was read: free the memory now (the offset stays)
            kept.append((fd, size))
            while len(kept) > 16:
                os.close(kept.pop(0)[0])
            self.held = kept

        def allowed(self, run):
            thread = threading.current_thread()
            return thread is main or (run is not None and thread not in run.old)

    io = Output()

    def child():
        io.forked = True

    os.register_at_fork(after_in_child=child)

    def write_(self, text):
        if io.forked:  # a forked child: fd 1 is still the execution's file, if any
            if not isinstance(text, str):
                return write(text)  # ipykernel's TypeError
            os.write(1, text.encode("utf-8", "replace"))
            return len(text)
        run = io.current
        if not io.allowed(run):
            return len(text) if isinstance(text, str) else write(text)
        if run is None or not isinstance(text, str):
            return write(text)
        run.put(text)
        return len(text)

    def flush_(self):
        run = io.current
        if run is not None and io.allowed(run):
            with run.lock:
                run.drain()
        if run is None or run.sink is write:
            return flush()
        return None

    class Method:
        """A data descriptor, so that it stays in force when something assigns stream.write
        (IPython's run_cell tees the stream that way, and restores what it found)."""

        def __init__(self, function, original):
            self.function, self.original = function, original
            self.key = "_kgpool_" + function.__name__

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

    base = type(stream)
    hooked = type(base.__name__, (base,), {"__module__": base.__module__,
                                           "__qualname__": base.__qualname__,
                                           "write": Method(write_, base.write),
                                           "flush": Method(flush_, base.flush)})
    stream.__dict__.pop("write", None)
    stream.__dict__.pop("flush", None)
    stream.__class__ = hooked

    original_quiet = shell.displayhook.quiet

    def quiet():
        run = io.current
        if run is None:
            return original_quiet()
        if run.quiet is None:
            try:
                cell = shell.transform_cell(run.cell or "")
                run.quiet = DisplayHook.semicolon_at_end_of_expression(cell)
            except Exception:
                run.quiet = False
        return run.quiet

    shell.displayhook.quiet = quiet

    kernel = getattr(shell, "kernel", None)
    do_execute = getattr(kernel, "do_execute", None)
    if do_execute is not None:
        @functools.wraps(do_execute)
        async def execute(*args, **kwargs):
            if io.current is not None:
                return await do_execute(*args, **kwargs)
            io.begin(write, kwargs.get("code", args[0] if args else ""))
            try:
                return await do_execute(*args, **kwargs)
            finally:
                io.end()

        kernel.do_execute = execute
    shell.kgpool_io = io
