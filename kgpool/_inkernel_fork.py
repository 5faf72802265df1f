"""Runs inside a --fork template kernel (sent as source, never imported by kgpool itself).

Before the init cells, `_kgpool_fork_setup` notes which descriptors and threads the kernel and
kgpool have (so that those the init cells open can be told apart). After them,
`_kgpool_fork_install` checks that forking is safe (no CUDA, no Python threads the init cells
left running), then serves a control socket on the kernel's main thread. Each fork request binds
the worker's listening socket, freezes the garbage collector's objects (so that collections in
the workers never write to the pages they share with the template) and forks. The child becomes
a worker: a session of its own that dies with the template, default signal handlers, the
kernel's and kgpool's descriptors pointed at /dev/null (the init cells' left alone), stdout
captured as in any kernel, stderr its own, numpy's global generator reseeded; it serves the
direct channel's protocol (kgpool/_inkernel.py) on a fresh event loop and leaves only by
os._exit. Endpoints the direct channel refuses (top-level await, ...) run through the shell's own
run_cell under the same capture. The template reaps its workers and reports their exit
statuses on the control socket. Frames are a 4-byte big-endian length and a JSON document.
"""

import asyncio
import ctypes
import faulthandler
import gc
import json
import os
import signal
import socket
import struct
import sys
import threading
import traceback

_MEMFD = "/memfd:kgpool-stdout"  # kgpool's per-execution stdout files (_inkernel_io.py)
_PR_SET_PDEATHSIG = 1
_HEADER = struct.Struct(">I")
# Looked up in the template, before any fork: a child must not need the dynamic loader's lock,
# which another thread of the template may have held when it forked.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl


def _fds():
    """The descriptors open now (the one listdir itself used is gone again)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        found.add(int(name))
    return found


def _target(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def _rss():
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _kgpool_fork_setup():
    """Before the init cells: what the kernel and kgpool have open and running."""
    shell = get_ipython()  # noqa: F821  (a kernel global)
    shell.kgpool_fork_baseline = (_fds(), {t.ident for t in threading.enumerate()}, _rss())


def _thread_name(thread):
    target = getattr(thread, "_target", None)
    where = getattr(target, "__qualname__", None) or type(thread).__qualname__
    module = getattr(target, "__module__", None) or type(thread).__module__
    return f"{thread.name!r} ({module}.{where}{', daemon' if thread.daemon else ''})"


def _cuda():
    """Why CUDA looks initialised in this process, or None: a process that has initialised
    the CUDA driver cannot use it again after a fork (the child's calls fail or hang)."""
    for fd in sorted(_fds()):
        if _target(fd).startswith("/dev/nvidia"):
            return f"descriptor {fd} is open on {_target(fd)} (the CUDA driver is initialised)"
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        if cuda is not None and cuda.is_initialized():
            return "torch.cuda is initialised"
    except Exception:  # a half-imported torch: nothing to say
        pass
    return None


def _kgpool_fork_install(path, cells, allow_threads):
    """After the init cells: check, then serve fork requests on `path`. `cells` are the
    endpoint cells and ResponseInfo cells, as the direct channel got them. Returns what kgpool
    reports: refusals, warnings, the size of the init cells' state."""
    shell = get_ipython()  # noqa: F821  (a kernel global)
    fds, threads, rss = shell.kgpool_fork_baseline
    main = threading.main_thread()
    extra = [t for t in threading.enumerate() if t.ident not in threads and t is not main]
    opened = sorted(fd for fd in _fds() - fds if not _target(fd).startswith(_MEMFD))
    report = {"threads": [_thread_name(t) for t in extra], "cuda": _cuda(),
              "descriptors": [f"{fd} ({_target(fd)})" for fd in opened],
              "state": max(0, _rss() - rss), "installed": False}
    if report["cuda"] or (report["threads"] and not allow_threads):
        return report
    if threading.current_thread() is not main:
        raise RuntimeError("the template must fork on the kernel's main thread")
    template = _Template(shell, set(opened), cells)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    shell.kgpool_fork_server = asyncio.ensure_future(
        asyncio.start_unix_server(template.serve, sock=listener))
    report["installed"] = True
    return report


def _frame(data):
    payload = json.dumps(data).encode("utf-8")
    return _HEADER.pack(len(payload)) + payload


class _Template:
    """The template's side of the control socket: forks workers, reaps them, reports."""

    def __init__(self, shell, keep, cells):
        self.shell, self.keep, self.cells = shell, keep, cells
        self.writer = None
        self.exits = []  # reported before kgpool connected (not expected, but never lost)

    async def serve(self, reader, writer):
        self.writer = writer
        for pid, status in self.exits:
            self.report(pid, status)
        try:
            while True:
                size = _HEADER.unpack(await reader.readexactly(_HEADER.size))[0]
                request = json.loads(await reader.readexactly(size))
                try:
                    reply = {"pid": self.fork(request["fork"])}
                except Exception as exc:  # kgpool says why the slot could not be filled
                    reply = {"error": f"{type(exc).__name__}: {exc}"}
                writer.write(_frame({"id": request["id"], **reply}))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # kgpool closed the socket: it shuts the template down next

    def fork(self, spec):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(spec["socket"])
            listener.listen(1)
            template = os.getpid()
            gc.freeze()  # a worker's collections never touch (so never copy) these objects
            pid = os.fork()
            if pid == 0:
                try:
                    _Worker(self.shell, self.keep, self.cells, spec).run(listener, template)
                finally:
                    os._exit(70)  # only if becoming a worker failed (logged by then)
        finally:
            listener.close()
        self.watch(pid)
        return pid

    def watch(self, pid):
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(pid)
        loop.add_reader(pidfd, self.reap, pid, pidfd)

    def reap(self, pid, pidfd):
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        try:
            status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        except ChildProcessError:  # reaped by someone else (SIGCHLD ignored): unknown
            status = None
        self.report(pid, status)

    def report(self, pid, status):
        if self.writer is None or self.writer.is_closing():
            self.exits.append((pid, status))
            return
        self.writer.write(_frame({"exit": pid, "status": status}))


def _stdout_write(text):
    """What the captured stdout does outside executions in a worker: fd 1 (/dev/null then)."""
    if not isinstance(text, str):
        raise TypeError(f"write() argument must be str, not {type(text).__name__}")
    os.write(1, text.encode("utf-8", "replace"))
    return len(text)


class _Worker:
    """The child's side: turn a copy of the template into a worker, then serve."""

    def __init__(self, shell, keep, cells, spec):
        self.shell, self.keep, self.cells, self.spec = shell, keep, cells, spec
        self.kept = []  # replaced objects: never deallocated (their sockets are the template's)

    def run(self, listener, template):
        try:
            signal.set_wakeup_fd(-1)  # the template's loop's: signals must not wake it
            os.setsid()
            if _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or \
                    os.getppid() != template:
                os._exit(71)  # the template is gone already
            self.signals()
            log = self.descriptors(listener.fileno())
            self.stacks()
            self.streams(log)
            self.reseed()
            serve = self.server()
        except BaseException:
            traceback.print_exc(file=sys.__stderr__)
            raise
        self.serve(serve, listener)

    def signals(self):
        """Python's own defaults, whatever the kernel or the init cells installed; SIGINT is
        ignored between calls, as ipykernel ignores it between executions (each call raises
        KeyboardInterrupt on it: kgpool interrupts a cell nobody reads any more)."""
        ignored = {signal.SIGPIPE, getattr(signal, "SIGXFSZ", signal.SIGPIPE), signal.SIGINT}
        for sig in signal.valid_signals():
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                continue
            wanted = signal.SIG_IGN if sig in ignored else signal.SIG_DFL
            try:
                if signal.getsignal(sig) is not wanted:
                    signal.signal(sig, wanted)
            except (OSError, ValueError, RuntimeError):
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, ())

    def stacks(self):
        """SIGUSR2 dumps every thread's stack to the worker's own file: kgpool's abort reads it
        to say where a request hung."""
        stacks = open(self.spec["stacks"], "w")
        self.kept.append(stacks)
        faulthandler.register(signal.SIGUSR2, file=stacks, all_threads=True, chain=False)

    def descriptors(self, listener):
        """Point every descriptor the init cells did not open at /dev/null (its ZMQ sockets,
        pipes and kgpool's files stay the template's); fd 2 becomes the kernel's own stderr,
        i.e. kgpool's log. Returns that log descriptor."""
        stderr = getattr(sys.stderr, "_original_stdstream_copy", None)
        if stderr is not None:
            os.dup2(stderr, 2)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in _fds():
            if fd not in self.keep and fd not in (2, listener, null):
                os.dup2(null, fd, inheritable=fd in (0, 1))
        os.close(null)
        return 2

    def streams(self, log):
        shell = self.shell
        output = shell.kgpool_io
        output.forked = False  # set by _inkernel_io's at-fork hook: this child captures
        output.current, output.held = None, []
        self.kept.append((output.write, output.flush, sys.stderr))
        output.write, output.flush = _stdout_write, lambda: None
        # what cells write to sys.stderr is dropped, as kgpool drops a kernel's stderr stream
        sys.stderr = open(os.devnull, "w", buffering=1, encoding="utf-8", errors="replace")
        if faulthandler.is_enabled():
            faulthandler.enable(file=log, all_threads=True)

    def reseed(self):
        """Every worker starts as a copy of one generator state: numpy's global one would
        draw the same numbers in all of them (Python's random module reseeds itself)."""
        numpy = sys.modules.get("numpy")
        seed = getattr(getattr(numpy, "random", None), "seed", None)
        if seed is not None:
            seed()

    def server(self):
        """The direct channel's server, with the endpoints it refused run by the shell."""
        shell = self.shell
        runner, compiled, server = shell.kgpool_direct_parts
        parts = list(compiled)
        for index, entry in enumerate(compiled):
            if entry is None:
                source, info = self.cells[index]
                parts[index] = (_ShellPart(source, True),
                                _ShellPart(info, False) if info is not None else None)
        runner.__class__ = _shell_runner(type(runner))
        hook = shell.displayhook
        hook.finish_displayhook = lambda: _finish_displayhook(hook, runner)
        return server(runner, parts)

    def serve(self, serve, listener):
        asyncio.events._set_running_loop(None)  # the template's loop is not this process's
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            from IPython.core import async_helpers
            self.kept.append(async_helpers._asyncio_event_loop)
            async_helpers._asyncio_event_loop = None  # the template's, if it made one
        except (ImportError, AttributeError):
            pass
        servers = []

        async def once(reader, writer):  # kgpool's one connection; its end is the worker's
            servers[0].close()
            try:
                await serve(reader, writer)
            finally:
                os._exit(0)

        try:
            servers.append(loop.run_until_complete(
                asyncio.start_unix_server(once, sock=listener)))
            loop.run_forever()
        except BaseException:
            traceback.print_exc(file=sys.__stderr__)
        os._exit(0)


class _ShellPart:
    """An endpoint the direct channel could not compile: run as the Jupyter channel would
    run it, by the shell's own run_cell."""

    quiet = None  # the capture reads the trailing ';' from the cell

    def __init__(self, source, bound):
        self.source, self.bound = source, bound

    def bind(self, shell, request, batch):
        """REQUEST (or a batch's REQUESTS) as data, as kgpool's own execute_requests bind it:
        the cell runs as the notebook has it, line for line."""
        if self.bound and batch is not None:
            shell.user_ns["REQUESTS"], shell.user_ns["RESPONSES"] = list(batch), None
        elif self.bound:
            shell.user_ns["REQUEST"] = request


def _shell_runner(base):
    class ForkRunner(base):
        def run_cell(self, part, request):
            if not isinstance(part, _ShellPart):
                return super().run_cell(part, request)
            part.bind(self.shell, request, self.batch)
            running = asyncio.events._get_running_loop()
            asyncio.events._set_running_loop(None)  # top-level await: IPython's own loop
            try:
                return self.shell.run_cell(part.source, store_history=False, silent=False)
            finally:
                asyncio.events._set_running_loop(running)
    ForkRunner.__name__ = ForkRunner.__qualname__ = base.__name__
    return ForkRunner


def _finish_displayhook(hook, runner):
    """ipykernel's finish_displayhook, recording the execute_result it would send."""
    sys.stdout.flush()
    messages = runner.displays.messages
    if hook.msg and hook.msg["content"]["data"] and messages is not None:
        messages.add("execute_result", hook.msg["content"])
    hook.msg = None
