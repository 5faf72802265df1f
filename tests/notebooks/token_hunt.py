"""Every way a process of kgpool's user (a kernel) might find kgpool's auth token.

token_hunt.ipynb runs this in its init cell and answers GET /hunt with what it found;
tests/test_secrets.py also runs it against a process that protects nothing, to show that each
probe finds a token that is there. Tokens look like kgpool-secret-<32 hex digits>.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import sys
from typing import Any

PATTERN = re.compile(rb"kgpool-secret-[0-9a-f]{32}")
READ_LIMIT = 8 << 20
SKIP_PROC = {"mem", "pagemap", "clear_refs", "kpageflags", "kpagecount"}


class Hunt:
    def __init__(self) -> None:
        self.matches: dict[str, list[str]] = {}
        self.access: dict[str, str] = {}  # location -> "read" or the error that refused it

    def look(self, where: str, data: bytes) -> None:
        found = sorted({m.decode() for m in PATTERN.findall(data)})
        if found:
            self.matches.setdefault(where, []).extend(found)

    def read(self, path: str, where: str | None = None) -> None:
        where = where or path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            self.access[where] = type(exc).__name__
            return
        chunks, size = [], 0
        try:
            while size < READ_LIMIT:
                try:
                    chunk = os.read(fd, 1 << 16)
                except OSError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        self.access[where] = "read"
        self.look(where, b"".join(chunks))

    def memory(self, pid: int) -> None:
        where = f"/proc/{pid}/mem"
        try:
            with open(f"/proc/{pid}/maps") as maps_file:
                maps = maps_file.read().splitlines()
            mem = open(f"/proc/{pid}/mem", "rb", 0)
        except OSError as exc:
            self.access[where] = type(exc).__name__
            return
        with mem:
            for line in maps:
                fields = line.split()
                if "r" not in fields[1] or fields[-1] in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                try:
                    mem.seek(start)
                    self.look(where, mem.read(end - start))
                except (OSError, OverflowError, ValueError):
                    continue
        self.access[where] = "read"

    def ptrace(self, pid: int) -> None:
        """Attaching would give the memory word by word; whether it is allowed is enough."""
        libc = ctypes.CDLL(None, use_errno=True)
        where = f"ptrace {pid}"
        if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
            self.access[where] = os.strerror(ctypes.get_errno())
            return
        os.waitpid(pid, 0x40000000)  # __WALL: until it stops
        libc.ptrace(17, pid, None, None)  # PTRACE_DETACH: it runs on
        self.access[where] = "attached"

    def process(self, pid: int, attach: bool) -> None:
        base = f"/proc/{pid}"
        try:
            names = os.listdir(base)
        except OSError as exc:
            self.access[base] = type(exc).__name__
            return
        for name in names:
            path = f"{base}/{name}"
            if name not in SKIP_PROC and os.path.isfile(path):
                self.read(path)
        for sub in ("fd", "fdinfo", "map_files"):
            try:
                entries = os.listdir(f"{base}/{sub}")
            except OSError as exc:
                self.access[f"{base}/{sub}"] = type(exc).__name__
                continue
            for entry in entries:
                self.read(f"{base}/{sub}/{entry}")
        for task in glob.glob(f"{base}/task/*"):
            for name in ("environ", "cmdline", "comm"):
                self.read(f"{task}/{name}")
        self.memory(pid)
        if attach:
            self.ptrace(pid)

    def tree(self, root: str, budget: list[int]) -> None:
        for folder, dirs, files in os.walk(root, onerror=lambda exc: self.access.update(
                {str(exc.filename): type(exc).__name__})):
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
            for name in files:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
                path = os.path.join(folder, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    self.read(path)

    def result(self) -> dict[str, Any]:
        return {"matches": self.matches, "access": self.access}


def children_of(pid: int) -> list[int]:
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as file:
                if int(file.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(stat.split("/")[2]))
        except (OSError, ValueError, IndexError):
            continue
    return found


def hunt(pids: list[int], roots: list[str], paths: list[str], attach: list[int]) -> dict[str, Any]:
    found = Hunt()
    found.look("os.environ", json.dumps(dict(os.environ)).encode())
    for pid in pids:
        found.process(pid, pid in attach)
    budget = [5000]
    for root in roots:
        found.tree(root, budget)
    for path in paths:
        found.read(path)
    return found.result()


def from_kernel(request: dict[str, Any]) -> dict[str, Any]:
    """In a kernel kgpool started: kgpool (the parent), every kernel it started, this one;
    everything kgpool and jupyter write; the kernel's own connection file; `?path=` files."""
    server = os.getppid()
    pids = sorted({server, os.getpid(), *children_of(server)})
    roots = [os.path.expanduser("~"), os.getcwd(), *filter(None, [os.environ.get("TMPDIR")])]
    try:
        from jupyter_core.paths import jupyter_runtime_dir
        roots.append(jupyter_runtime_dir())
    except ImportError:
        pass
    paths = list(request.get("args", {}).get("path", []))
    with open("/proc/self/cmdline", "rb") as cmdline:
        argv = cmdline.read().split(b"\0")
    connection_file = argv[argv.index(b"-f") + 1].decode() if b"-f" in argv else ""
    paths.append(connection_file)
    for found in glob.glob("/tmp/kgpool-*") + glob.glob("/tmp/tmp*.json"):  # what kgpool and
        if os.stat(found).st_uid == os.getuid():  # jupyter_client write for every kernel
            (roots if os.path.isdir(found) else paths).append(found)
    result = hunt(pids, roots, paths, attach=[server])
    result.update(server=server, environ=sorted(os.environ), connection_file=connection_file,
                  tmpdir=os.environ.get("TMPDIR"))
    return result


if __name__ == "__main__":  # python token_hunt.py PID [PATH...]: a hunt from outside
    target = int(sys.argv[1])
    print(json.dumps(hunt([target], [], sys.argv[2:], attach=[target])))
