"""Keeping the auth token from notebook code, which runs as kgpool's own user: a re-exec that
drops the token from /proc/<pid>/environ and /cmdline, a process other processes of that user
may not inspect, and a token file the kernels cannot open (Landlock). Only the CLI calls this.

What each measure covers was measured on Linux 6.18 as an unprivileged user (README,
"Untrusted clients"); none of them stops root or a process with CAP_SYS_PTRACE.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

from jupyter_core.paths import jupyter_runtime_dir

from .config import SECRET_ENV, Settings
from .errors import ConfigError

log = logging.getLogger(__name__)

HANDOVER_ENV = "KGPOOL_HANDOVER_FD"
_MEMFD_NAME = "kgpool-handover"
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
# landlock_create_ruleset, landlock_add_rule, landlock_restrict_self: one number on every
# architecture but alpha (the syscalls came after the tables were unified).
_LANDLOCK_SYSCALLS = (444, 445, 446)
_LANDLOCK_ARCHES = {"x86_64", "aarch64", "arm64", "riscv64", "ppc64le", "s390x", "i686",
                    "armv7l", "loongarch64"}
_LANDLOCK_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_READ_FILE = 1 << 2
_REFER = 1 << 13  # Landlock ABI 2: without it handled, no file may change directory at all
_MAX_RULES = 20000


# ----- re-exec: the token out of /proc/<pid>/environ and /proc/<pid>/cmdline ---------------

def _names_token(arg: str) -> bool:
    """`--auth-token[=X]` (or an abbreviation argparse accepts), KG's `--...auth_token[=X]`."""
    if not arg.startswith("--"):
        return False
    name = arg.split("=", 1)[0].lstrip("-").lower().replace("-", "_")
    return name.endswith("auth_token") or (len(name) >= 2 and "auth_token".startswith(name))


def carries_token(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether this process's environment or command line holds a token."""
    return any(environ.get(name) for name in SECRET_ENV) or any(map(_names_token, argv))


def visible_argv(argv: Sequence[str]) -> list[str]:
    """The arguments as `ps` may show them: every token value replaced by ***."""
    shown: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            shown.append("***")
            hide_next = False
        elif arg == "--":
            hide_next = False
            shown.append(arg)
        elif _names_token(arg):
            hide_next = "=" not in arg
            shown.append(arg.split("=", 1)[0] + "=***" if "=" in arg else arg)
        else:
            shown.append(arg)
    return shown


def reexec_without_secrets(argv: Sequence[str], environ: Mapping[str, str]) -> str:
    """Replace this process by the same command without the token in its environment or
    arguments; the real ones travel in an anonymous memory file whose descriptor the new
    process reads and closes first thing. Returns only when that is impossible, saying why."""
    if not hasattr(os, "memfd_create") or not sys.executable:
        return "this platform has no memfd_create or no interpreter path"
    orig = list(sys.orig_argv)
    start = len(orig) - len(sys.argv) + 1
    if start < 1 or orig[start:] != list(sys.argv[1:]) or list(argv) != sys.argv[1:]:
        return "the interpreter's command line could not be rebuilt"
    payload = json.dumps({"argv": list(argv),
                          "env": {k: environ[k] for k in SECRET_ENV if k in environ}}).encode()
    fd = os.memfd_create(_MEMFD_NAME, os.MFD_CLOEXEC)
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    os.set_inheritable(fd, True)
    env = {k: v for k, v in environ.items() if k not in SECRET_ENV}
    env[HANDOVER_ENV] = str(fd)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *orig[1:start], *visible_argv(argv)], env)
    except OSError as exc:
        os.close(fd)
        return f"re-executing {sys.executable} failed: {exc}"
    raise AssertionError("unreachable")  # pragma: no cover


def take_handover(environ: MutableMapping[str, str]) -> tuple[list[str], dict[str, str]] | None:
    """In the re-executed process: the real arguments and secrets, the descriptor closed."""
    text = environ.pop(HANDOVER_ENV, None)
    if text is None:
        return None
    try:
        fd = int(text)
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{_MEMFD_NAME}"):
            raise ValueError(text)
    except (ValueError, OSError):
        raise ConfigError(f"{HANDOVER_ENV} is kgpool's own; do not set it") from None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    data = json.loads(b"".join(chunks))
    return [str(a) for a in data["argv"]], {str(k): str(v) for k, v in data["env"].items()}


# ----- no inspection by other processes of the same user -----------------------------------

def forbid_inspection() -> bool:
    """prctl(PR_SET_DUMPABLE, 0): /proc/<pid>/environ, mem, maps, fd/ and ptrace are refused
    to every process without CAP_SYS_PTRACE, the kernels included (cmdline stays readable)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


# ----- the token file: unreadable for kgpool and its kernels once read ---------------------

@dataclass
class Sealing:
    """What seal_token_file did: sealed, or why not; directories whose new files kgpool and
    the kernels can no longer read; a private temporary folder made for that reason."""

    sealed: bool = False
    reason: str = ""
    exposed: list[str] = field(default_factory=list)
    tmpdir: str | None = None
    notes: list[str] = field(default_factory=list)


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _ancestors(path: str) -> list[str]:
    """'/a/b/c' -> ['/', '/a', '/a/b']."""
    parts = path.strip("/").split("/")[:-1]
    return ["/"] + ["/" + "/".join(parts[:i + 1]) for i in range(len(parts))]


def _landlock() -> tuple[ctypes.CDLL, int] | str:
    if platform.system() != "Linux" or platform.machine().lower() not in _LANDLOCK_ARCHES:
        return "Landlock needs Linux"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = int(libc.syscall(_LANDLOCK_SYSCALLS[0], None, ctypes.c_size_t(0),
                           ctypes.c_uint32(_LANDLOCK_VERSION)))
    if abi < 0:
        return f"Landlock is unavailable here ({os.strerror(ctypes.get_errno())})"
    if abi < 2:
        return f"Landlock ABI {abi} is too old (2, Linux 5.19, is needed)"
    return libc, abi


def landlock_unavailable() -> str:
    """Why this system cannot seal a file, or "" when it can."""
    found = _landlock()
    return found if isinstance(found, str) else ""


def _prepare(real: str, watched: Iterable[str], needed: Iterable[str], tempdir: str,
             result: Sealing) -> None:
    """Before sealing: make the folders kgpool and the kernels will need (a new entry directly
    in one of the token's folders could not be read afterwards) and list what stays exposed."""
    ancestors = set(_ancestors(real))
    for want in needed:
        path = os.path.realpath(want)
        missing = path
        while not os.path.exists(os.path.dirname(missing)) and missing != "/":
            missing = os.path.dirname(missing)
        if not os.path.exists(path) and os.path.dirname(missing) in ancestors:
            os.makedirs(path, mode=0o700, exist_ok=True)
    for want in watched:
        path = os.path.realpath(want)
        if path in ancestors and path not in result.exposed:
            result.exposed.append(path)
    if os.path.realpath(tempdir) in ancestors:
        result.tmpdir = tempfile.mkdtemp(prefix="kgpool-tmp-", dir=tempdir)


def _add_rules(libc: ctypes.CDLL, ruleset: int, real: str, dir_access: int) -> int:
    """Read access everywhere except `real`: a rule for every sibling of every folder on the
    way to it (symbolic links are skipped: what they point to is checked where it is)."""
    count = 0
    chain = _ancestors(real) + [real]
    for folder, below in zip(chain, chain[1:], strict=False):
        name = os.path.basename(below)
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name == name or entry.is_symlink():
                    continue
                count += 1
                if count > _MAX_RULES:
                    raise OSError(f"more than {_MAX_RULES} entries beside the token's folders")
                try:
                    fd = os.open(entry.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                    rule = _PathBeneath(dir_access if is_dir else _READ_FILE, fd)
                    failed = libc.syscall(_LANDLOCK_SYSCALLS[1], ruleset, _RULE_PATH_BENEATH,
                                          ctypes.byref(rule), ctypes.c_uint32(0)) != 0
                finally:
                    os.close(fd)
                if failed and is_dir:  # a whole tree would become unreadable: give up
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule {entry.path}")
    return count


def seal_token_file(path: str, *, watched: Iterable[str] = (), needed: Iterable[str] = (),
                    tempdir: str = "/tmp") -> Sealing:
    """Make `path` unreadable for this process and every process it starts (Landlock), keeping
    the rest of the file system readable. Call it with one thread, before any kernel starts.

    `needed` folders are made first if they would otherwise appear directly in a folder on the
    token's path; `watched` ones that are on that path are reported as exposed."""
    result = Sealing()
    real = os.path.realpath(path)
    found = _landlock()
    if isinstance(found, str):
        result.reason = found
        return result
    libc, _abi = found
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        result.reason = "kgpool already runs several threads"
        return result
    try:
        if os.stat(real).st_nlink > 1:
            result.notes.append(f"{real} has other hard links; those stay readable")
        _prepare(real, watched, needed, tempdir, result)
        handled = ctypes.c_uint64(_READ_FILE | _REFER)
        ruleset = int(libc.syscall(_LANDLOCK_SYSCALLS[0], ctypes.byref(handled),
                                   ctypes.c_size_t(8), ctypes.c_uint32(0)))
        if ruleset < 0:
            raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
        try:
            _add_rules(libc, ruleset, real, _READ_FILE | _REFER)
            if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
                    libc.syscall(_LANDLOCK_SYSCALLS[2], ruleset, ctypes.c_uint32(0)) != 0:
                raise OSError(ctypes.get_errno(), "landlock_restrict_self")
        finally:
            os.close(ruleset)
    except OSError as exc:
        result.reason = f"sealing failed: {exc}"
        return result
    try:
        with open(real, "rb"):
            result.reason = "the file is still readable after sealing"
            return result
    except PermissionError:
        result.sealed = True
    return result


def protect_token(settings: Settings, on_exit: Callable[..., object]) -> Settings:
    """In kgpool's own process, once the settings are known and before any kernel starts: no
    process of kgpool's user may inspect this one, and a token file is sealed off. Returns the
    settings the kernels start with (a private TMPDIR when sealing needs one)."""
    if not forbid_inspection():
        log.warning("prctl(PR_SET_DUMPABLE) failed: processes of this user (kernels included) "
                    "can read kgpool's memory, and the token in it")
    if settings.auth_token in "\0".join(sys.orig_argv):
        log.warning("the token appears in kgpool's command line, which every local user can "
                    "read: use --auth-token-file")
    if not settings.auth_token_file:
        return settings
    path = settings.auth_token_file
    if not os.path.isfile(path):  # a pipe, /dev/stdin: read once, it holds nothing more
        log.info("--auth-token-file %s is not a regular file: nothing to seal", path)
        return settings
    home = os.path.expanduser("~")
    needed = [jupyter_runtime_dir(),
              os.environ.get("IPYTHONDIR") or os.path.join(home, ".ipython")]
    folders = [os.path.abspath(arg.partition("=")[0]) for arg in settings.notebooks]
    watched = [tempfile.gettempdir(), "/dev/shm", home, os.getcwd(), *needed,
               *(f if os.path.isdir(f) else os.path.dirname(f) for f in folders),
               *([settings.static_path] if settings.static_path else [])]
    result = seal_token_file(path, watched=watched, needed=needed,
                             tempdir=tempfile.gettempdir())
    if result.tmpdir is not None:
        on_exit(shutil.rmtree, result.tmpdir, True)
        tempfile.tempdir = result.tmpdir
        settings = settings.replace(kernel_env={**settings.kernel_env, "TMPDIR": result.tmpdir})
    for note in result.notes:
        log.warning("--auth-token-file: %s", note)
    if not result.sealed:
        log.warning("--auth-token-file %s stays readable by the notebooks' code, which runs as "
                    "the same user: %s", path, result.reason)
        return settings
    log.info("--auth-token-file %s sealed: neither kgpool nor its kernels can open it again",
             path)
    if result.exposed:
        log.warning("--auth-token-file %s: files created after start-up directly in %s cannot "
                    "be read by kgpool or its kernels (sealing allows reads only beside the "
                    "token's folders); keep the token file in a folder of its own, such as a "
                    "Kubernetes secret mount", path, ", ".join(result.exposed))
    return settings
