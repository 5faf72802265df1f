"""Process bookkeeping for the benchmark: /proc readings and servers started in their own sessions.

Every process the driver starts is registered here and torn down by `stop_all()` (called from a
`finally` and from signal handlers): SIGTERM to the process group, then SIGKILL, then every
descendant ever seen (kernels live in process groups of their own, so killing the server's group
does not reach them) is killed by pid, after checking its start time so a recycled pid is never hit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

Key = tuple[int, int]  # (pid, starttime in ticks since boot): survives pid reuse


def read_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, utime+stime ticks, starttime) or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = data[data.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime=14, stime=15, starttime=22 (1-based fields)
    state = rest[0]
    if state == "Z":
        return None
    return int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[19])


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KB
    except (FileNotFoundError, ProcessLookupError):
        return 0


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except (FileNotFoundError, ProcessLookupError):
        return []


def is_kernel(pid: int) -> bool:
    return any("ipykernel" in a for a in cmdline(pid))


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = read_stat(int(name))
        if st:
            children.setdefault(st[0], []).append(int(name))
    out: list[int] = []
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(key: Key) -> bool:
    st = read_stat(key[0])
    return st is not None and st[2] == key[1]


@dataclass
class Snapshot:
    """CPU ticks and RSS of a server process and its descendants at one moment."""

    server_ticks: dict[Key, int] = field(default_factory=dict)
    kernel_ticks: dict[Key, int] = field(default_factory=dict)
    server_rss_kb: int = 0
    kernel_rss_kb: int = 0


def _delta(before: dict[Key, int], after: dict[Key, int]) -> int:
    return sum(t - before.get(k, 0) for k, t in after.items())


def cpu_ms(before: Snapshot, after: Snapshot) -> tuple[float, float]:
    """(server ms, kernels ms) used between two snapshots."""
    ms = 1000.0 / CLK_TCK
    return (
        _delta(before.server_ticks, after.server_ticks) * ms,
        _delta(before.kernel_ticks, after.kernel_ticks) * ms,
    )


_REGISTRY: list[Managed] = []  # started and not yet stopped
ALL: list[Managed] = []  # every process ever started, for the final leftover check


class Managed:
    """A process started in a new session, with every descendant it ever had remembered."""

    def __init__(self, name: str, cmd: list[str], log_path: str, env: dict[str, str] | None = None):
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.seen: set[Key] = set()
        self.stop_info: dict | None = None
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        st = read_stat(self.proc.pid)
        self.key: Key = (self.proc.pid, st[2] if st else 0)
        _REGISTRY.append(self)
        ALL.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def refresh(self) -> list[int]:
        """Descendant pids now; remembers them for cleanup."""
        pids = descendants(self.pid) if self.running() else []
        for p in pids:
            st = read_stat(p)
            if st:
                self.seen.add((p, st[2]))
        return pids

    def kernel_keys(self) -> list[Key]:
        return [k for k in self.seen if alive(k) and is_kernel(k[0])]

    def snapshot(self) -> Snapshot:
        snap = Snapshot()
        for pid in [self.pid, *self.refresh()]:
            st = read_stat(pid)
            if not st:
                continue
            key = (pid, st[2])
            if pid != self.pid and is_kernel(pid):
                snap.kernel_ticks[key] = st[1]
                snap.kernel_rss_kb += rss_kb(pid)
            else:
                snap.server_ticks[key] = st[1]
                snap.server_rss_kb += rss_kb(pid)
        return snap

    def stop(self, grace: float = 20.0) -> None:
        """Graceful SIGTERM to the group, SIGKILL after `grace`, then kill leftover descendants."""
        self.refresh()
        t0 = time.monotonic()
        was_running, sigkill = self.running(), False
        if was_running:
            _killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                sigkill = True
                _killpg(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        else:
            _killpg(self.pid, signal.SIGKILL)  # group members may outlive the leader
        deadline = time.monotonic() + 5
        left = [k for k in self.seen if alive(k)]
        # how the process went away: the harness has to clean up after it only when it misbehaves
        self.stop_info = {
            "was_running": was_running,
            "exit": self.proc.returncode,
            "stop_s": round(time.monotonic() - t0, 3),
            "sigkill": sigkill,
            "descendants_left": len(left),
        }
        for k in left:
            _kill(k, signal.SIGTERM)
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [k for k in left if alive(k)]
        for k in left:
            _kill(k, signal.SIGKILL)
            try:
                if os.getpgid(k[0]) == k[0]:
                    _killpg(k[0], signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        if self in _REGISTRY:
            _REGISTRY.remove(self)

    def leftovers(self) -> list[int]:
        return [k[0] for k in self.seen if alive(k)]


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(key: Key, sig: int) -> None:
    if alive(key):
        try:
            os.kill(key[0], sig)
        except ProcessLookupError:
            pass


def leftovers() -> list[int]:
    return sorted({p for m in ALL for p in m.leftovers()})


def stop_all() -> None:
    for m in list(reversed(_REGISTRY)):
        try:
            m.stop(grace=10.0)
        except Exception as exc:  # noqa: BLE001 - keep cleaning the others
            print(f"cleanup of {m.name} failed: {exc}")


def _interrupted(signum: int, frame: object) -> None:  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")


def run_main(main: Callable[[list[str]], int], log: Callable[[str], None]) -> NoReturn:
    """A benchmark's entry point: main(argv) with SIGINT (also when started with it ignored,
    as background jobs are), SIGTERM and SIGHUP stopping it, then every process it started
    stopped; exits non-zero if one is still alive."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    rc = 1
    try:
        rc = main(sys.argv[1:])
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}); cleaning up")
        rc = 130
    finally:
        stop_all()
        left = leftovers()
        if left:
            log(f"ERROR: still alive after cleanup: {left}")
            rc = rc or 1
    sys.exit(rc)
