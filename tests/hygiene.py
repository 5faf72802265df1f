"""The suite leaves nothing behind: one private temp folder per run, and a check at the end.

Kernel connection files hold keys, and a server killed with SIGKILL cannot remove its own, so
every session works below one private folder and fails if something it made is still there:

- The folder: tests/run.sh makes it and names it in KGPOOL_TEST_TMP (as root, in a mount
  namespace of its own, it is mounted on /tmp: code that ignores TMPDIR lands in it too). A
  plain `pytest` makes /tmp/kgpool-tests-XXXXXX here and removes it at the end (set
  KGPOOL_TEST_KEEP_TMP=1 to keep it). Mode 1777, as /tmp: some tests run kgpool as another
  user. TMPDIR points at it: kgpool's runtime folders, pytest's tmp_path, every temporary
  file of the tests and of the processes they start.
- What tools would otherwise keep in HOME goes under <folder>/_suite (IPython's profile and
  history, which metakernel shares, Jupyter's runtime and config folders, Octave's history);
  matplotlib's font cache goes into the test cache folder ($KGPOOL_TEST_CACHE, default
  ~/.cache/kgpool-tests), the one place a second run reuses.
- At the end, after every fixture is torn down: each entry of the folder that was not there
  at the start is a leak (pytest's own basetemp, pytest-of-<user>, and _suite excepted): the
  session fails and lists them. When the folder is not /tmp itself, new entries of /tmp (and
  of /dev/shm) named as the suite names things are listed too; on a shared machine they may
  be another user's, so they fail the session only under CI.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# what the suite (kgpool, pytest, tempfile, R, Chromium, Jupyter) names things in a temp folder
SUITE_PATTERNS = ("kgpool*", "kgbench*", "pytest-of-*", "tmp*", "Rtmp*", ".org.chromium.*",
                  ".com.google.Chrome.*", "jupyter*", "ipykernel*", "matplotlib*", "octave*")
SHARED = ("/tmp", "/dev/shm")
HARNESS = "_suite"


class Hygiene:
    def __init__(self) -> None:
        self.folder = Path(os.environ.get("KGPOOL_TEST_TMP") or "")
        self.owned = not os.environ.get("KGPOOL_TEST_TMP")
        if self.owned:  # a plain `pytest`: this session's own folder
            self.folder = Path(tempfile.mkdtemp(prefix="kgpool-tests-", dir="/tmp"))
            self.folder.chmod(0o1777)
            os.environ["KGPOOL_TEST_TMP"] = str(self.folder)
        self.start = entries(self.folder)
        self.shared = {d: entries(Path(d)) for d in SHARED
                       if Path(d).is_dir() and not same(Path(d), self.folder)}

    def point_caches_here(self) -> None:
        cache = Path(os.environ.get("KGPOOL_TEST_CACHE") or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kgpool-tests")
        state = self.folder / HARNESS
        env = {"TMPDIR": str(self.folder),
               "IPYTHONDIR": str(state / "ipython"),
               "JUPYTER_RUNTIME_DIR": str(state / "jupyter-runtime"),
               "JUPYTER_CONFIG_DIR": str(state / "jupyter-config"),
               "OCTAVE_HISTFILE": str(state / "octave_hist"),
               "MPLCONFIGDIR": str(cache / "matplotlib")}
        for path in (state, cache / "matplotlib"):
            path.mkdir(parents=True, exist_ok=True)
        os.environ.update(env)
        tempfile.tempdir = str(self.folder)

    def leaks(self) -> tuple[list[str], list[str]]:
        """(entries of the private folder, new suite-like entries of shared folders)."""
        made = sorted(str(self.folder / name) for name in entries(self.folder) - self.start
                      if name != HARNESS and not name.startswith("pytest-of-"))
        shared = sorted(os.path.join(d, name) for d, before in self.shared.items()
                        for name in entries(Path(d)) - before
                        if any(fnmatch.fnmatch(name, p) for p in SUITE_PATTERNS)
                        and not name.startswith("kgpool-tests-"))  # other sessions' folders
        return made, shared

    def remove(self) -> None:
        if self.owned and not os.environ.get("KGPOOL_TEST_KEEP_TMP"):
            shutil.rmtree(self.folder, ignore_errors=True)


def entries(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def same(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


_HYGIENE: Hygiene | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Before anything is collected: the private folder, and the environment pointing at it
    (tmp_path, read lazily, lands in it too)."""
    global _HYGIENE
    if _HYGIENE is not None:
        return
    _HYGIENE = Hygiene()
    _HYGIENE.point_caches_here()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """After the last fixture's teardown: fail, with the list, if the session left anything."""
    if _HYGIENE is None:
        return
    made, shared = _HYGIENE.leaks()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    write = reporter.write_line if reporter is not None else print
    if made:
        write(f"\nLEFT BEHIND in the test temp folder {_HYGIENE.folder} (kgpool runtime "
              "folders hold kernel keys):", red=True)
        for path in made:
            write(f"  {path}  {describe(Path(path))}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if shared:
        strict = bool(os.environ.get("CI"))
        write(f"\nNEW in {' and '.join(_HYGIENE.shared)} during the session, named as the "
              "suite names things (code that ignores TMPDIR"
              + (")" if strict else ", or another user's processes on this machine)") + ":",
              red=strict, yellow=not strict)
        for path in shared:
            write(f"  {path}")
        if strict:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    global _HYGIENE
    if _HYGIENE is not None:
        _HYGIENE.remove()
        _HYGIENE = None


def describe(path: Path) -> str:
    """What a leftover holds, to tell a kgpool runtime folder from a test's own file."""
    try:
        if path.is_dir():
            inside = sorted(os.listdir(path))
            more = " ..." if inside[6:] else ""
            return f"({len(inside)} entries: {', '.join(inside[:6])}{more})"
        return f"({path.stat().st_size} bytes)"
    except OSError:
        return ""
