"""The notebooks being served: one NotebookService per notebook under its URL prefix, rolled
over to the file's new version when it changes (or on SIGHUP)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Settings
from .errors import ConfigError, KgpoolError
from .metrics import Metrics
from .notebook import Notebook, load_notebook
from .offload import Offload
from .pool import PoolStatus
from .routes import Route, Router
from .service import NotebookService

log = logging.getLogger(__name__)

# kgpool's own paths: served before any notebook route but one at the same literal path (a
# Kernel Gateway notebook may define `# GET /healthz`), never counted as API traffic. They are
# always reachable under KGPOOL_PREFIX too.
OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/_api/spec/swagger.json",
                       "/_api/spec/openapi.json"})
KGPOOL_PREFIX = "/_kgpool"
_PREFIX = re.compile(r"(/[A-Za-z0-9._~-]+)+\Z")


@dataclass(frozen=True)
class MountSpec:
    name: str  # the notebook's file name without .ipynb: log and metrics label
    path: Path
    prefix: str  # "" serves at the root
    kernels: int


def mount_specs(settings: Settings) -> list[MountSpec]:
    """NOTEBOOK arguments (files, folders, `file=/prefix`) -> what to serve where."""
    found: list[tuple[Path, str | None]] = []
    for arg in settings.notebooks:
        text, eq, prefix = arg.partition("=")
        path = Path(text)
        if path.is_dir():
            if eq:
                raise ConfigError(f"{arg}: a folder takes no prefix; each notebook is served "
                                  "under its own name")
            files = sorted(p for p in path.glob("*.ipynb") if p.is_file())
            if not files:
                raise ConfigError(f"{path}: no .ipynb file in this folder")
            found.extend((f, None) for f in files)
        else:
            found.append((path, prefix.rstrip("/") if eq else None))
    if not found:
        raise ConfigError("give at least one NOTEBOOK (or set KGPOOL_NOTEBOOK)")
    counts = _kernel_counts(settings.kernels_for)
    single = len(found) == 1
    specs, names, prefixes = [], set(), set()
    for path, given in found:
        name = path.stem
        prefix = given if given is not None else ("" if single else "/" + name)
        if prefix and not _PREFIX.match(prefix):
            raise ConfigError(f"prefix {prefix!r} for {path}: use /letters-digits-._~ segments")
        if name in names:
            raise ConfigError(f"two notebooks are named {name!r}; rename one")
        if prefix in prefixes:
            raise ConfigError(f"two notebooks would be served under {prefix or '/'}")
        names.add(name)
        prefixes.add(prefix)
        specs.append(MountSpec(name, path, prefix, counts.pop(name, settings.kernels)))
    if counts:
        raise ConfigError(f"--kernels-for names no served notebook: {', '.join(counts)}")
    return specs


def _kernel_counts(text: str) -> dict[str, int]:
    counts = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(f"--kernels-for wants NAME=N with N >= 1, not {item!r}")
        counts[name.strip()] = int(value)
    return counts


ClashCheck = Callable[["Mount", Notebook], None]


class Mount:
    """One notebook under its prefix: its service, and reloads of its file."""

    def __init__(self, spec: MountSpec, settings: Settings, metrics: Metrics,
                 warmups: asyncio.Semaphore, offload: Offload) -> None:
        self.spec = spec
        self.name, self.prefix = spec.name, spec.prefix
        self._settings = settings
        self.service = NotebookService(self._load(), settings, metrics.for_notebook(spec.name),
                                       path=spec.path, kernels=spec.kernels, warmups=warmups,
                                       offload=offload)
        self.reload_error: str | None = None
        self._stamp = _stamp(spec.path)
        self._lock = asyncio.Lock()

    @property
    def router(self) -> Router:
        return self.service.current.router

    def _load(self) -> Notebook:
        return load_notebook(self.spec.path, strict=self._settings.strict,
                             prefixes=self._settings.comment_prefixes)

    def statuses(self) -> list[PoolStatus]:
        return [self.service.status()]

    def changed(self) -> bool:
        return _stamp(self.spec.path) != self._stamp

    async def reload(self, clashes: ClashCheck) -> bool:
        """Roll the kernels over to the file's new version, one at a time; a version that
        cannot be read, clashes, or whose first kernel fails to warm is refused."""
        async with self._lock:
            self._stamp = _stamp(self.spec.path)
            try:
                notebook = self._load()
                clashes(self, notebook)
            except KgpoolError as exc:
                return self._refuse(str(exc))
            log.info("%s: warming the new version of %s", self.name, self.spec.path)
            try:
                await self.service.reload(notebook)
            except KgpoolError as exc:
                return self._refuse(str(exc))
            self.reload_error = None
            log.info("%s: reloaded; every kernel runs the new version", self.name)
            return True

    def _refuse(self, reason: str) -> bool:
        self.reload_error = reason
        log.error("%s: new version refused, the old one keeps serving: %s", self.name, reason)
        return False


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)


def _shape(template: str) -> tuple[tuple[str, bool], ...]:
    """What a template matches: literal prefixes and where parameters are, names aside."""
    return tuple((part.split(":", 1)[0], ":" in part) for part in template.split("/"))


def clashes(name: str, prefix: str, notebook: Notebook,
            others: list[tuple[str, str, Notebook]], strict: bool) -> list[str]:
    """ConfigError if a route of `notebook` under `prefix` has the same shape as a route of
    one of the `others` (name, prefix, notebook). A route at one of kgpool's own paths takes
    it (a warning; an error with --strict): kgpool's stays under /_kgpool."""
    mine = {_shape(prefix + ep.path): ep.path for ep in notebook.endpoints}
    warnings = []
    for path in sorted(OPS_PATHS):
        if _shape(path) in mine:
            message = (f"{name}: its endpoint {mine[_shape(path)]} takes {path}; "
                       f"kgpool's own {path} stays at {KGPOOL_PREFIX}{path}")
            if strict:
                raise ConfigError(message + " (refused: --strict)")
            warnings.append(message)
    for other, other_prefix, other_notebook in others:
        for ep in other_notebook.endpoints:
            shape = _shape(other_prefix + ep.path)
            if shape in mine:
                raise ConfigError(f"route clash: {name} {prefix}{mine[shape]} "
                                  f"and {other} {other_prefix}{ep.path}")
    return warnings


class Mounts:
    """All served notebooks; requests find theirs by URL prefix, longest first."""

    def __init__(self, specs: list[MountSpec], settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._reloads: set[asyncio.Task[bool]] = set()
        self._draining = False
        # warm-ups across every pool: a crash loop on a small pod must not start them all
        warmups = asyncio.Semaphore(settings.warmup_limit)
        self.offload = Offload()  # one helper process for every notebook's large messages
        self.all: list[Mount] = []
        for spec in specs:
            mount = Mount(spec, settings, metrics, warmups, self.offload)
            self.check_clashes(mount, mount.service.notebook)
            self.all.append(mount)
        self._by_prefix = sorted(self.all, key=lambda m: len(m.prefix), reverse=True)
        metrics.watch_pools(lambda: {m.name: m.statuses() for m in self.all})

    def check_clashes(self, mount: Mount, notebook: Notebook) -> None:
        """ConfigError if a route of `notebook` under mount.prefix has the same shape as
        another notebook's route; a warning for one that takes a kgpool path."""
        others = [(m.name, m.prefix, m.service.notebook) for m in self.all if m is not mount]
        for warning in clashes(mount.name, mount.prefix, notebook, others,
                               self._settings.strict):
            log.warning("%s", warning)

    def match(self, raw_path: str) -> tuple[Mount, Route, dict[str, str]] | None:
        for mount in self._by_prefix:
            if mount.prefix and not (raw_path == mount.prefix
                                     or raw_path.startswith(mount.prefix + "/")):
                continue
            found = mount.router.match(raw_path[len(mount.prefix):] or "/")
            if found is not None:
                return mount, found[0], found[1]
        return None

    def has_fixed(self, raw_path: str) -> bool:
        """Some notebook has a route without parameters at exactly this path."""
        for mount in self._by_prefix:
            if raw_path == mount.prefix or raw_path.startswith(mount.prefix + "/"):
                if mount.router.has_fixed(raw_path[len(mount.prefix):] or "/"):
                    return True
        return False

    def kgpool_path(self, raw_path: str) -> str | None:
        """Which of kgpool's own paths (OPS_PATHS) a path below base_url reaches, if any."""
        if raw_path.startswith(KGPOOL_PREFIX + "/"):
            path = raw_path[len(KGPOOL_PREFIX):]
            return path if path in OPS_PATHS else None
        if raw_path in OPS_PATHS and not self.has_fixed(raw_path):
            return raw_path
        return None

    def route_of(self, raw_path: str) -> tuple[str, str] | None:
        """(notebook, route template) a path would reach; None for no route or a bad path."""
        try:
            found = self.match(raw_path)
        except UnicodeDecodeError:
            return None
        return (found[0].name, found[1].path) if found is not None else None

    def begin(self) -> None:
        for mount in self.all:
            mount.service.begin()

    async def warmed(self) -> None:
        await asyncio.gather(*(m.service.warmed() for m in self.all))

    @property
    def ready(self) -> bool:
        return all(m.service.ready for m in self.all)

    async def drain(self, timeout: float) -> bool:
        """No reload from now on (a finished one must not make /readyz 200 again); let queued
        and running requests finish."""
        self._draining = True
        await self._stop_reloads()
        results = await asyncio.gather(*(m.service.drain(timeout) for m in self.all))
        return all(results)

    async def close(self) -> None:
        """Stop reloads in progress, then every pool."""
        self._draining = True
        await self._stop_reloads()
        await asyncio.gather(*(m.service.close() for m in self.all))
        self.offload.close()

    async def _stop_reloads(self) -> None:
        for task in list(self._reloads):
            task.cancel()
        await asyncio.gather(*self._reloads, return_exceptions=True)

    def reload(self, mount: Mount) -> None:
        if self._draining:
            log.info("%s: not reloaded: kgpool is stopping", mount.name)
            return
        task = asyncio.ensure_future(mount.reload(self.check_clashes))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    def reload_changed(self, force: bool = False) -> None:
        for mount in self.all:
            if force or mount.changed():
                self.reload(mount)

    async def watch(self, interval: float = 1.0) -> None:
        """Poll the notebook files; a file must hold still for one interval before a reload."""
        seen: dict[str, tuple[int, int]] = {}
        while True:
            await asyncio.sleep(interval)
            for mount in self.all:
                if not mount.changed():
                    seen.pop(mount.name, None)
                    continue
                stamp = _stamp(mount.spec.path)
                if seen.get(mount.name) == stamp and stamp != (0, 0):
                    seen.pop(mount.name)
                    self.reload(mount)
                else:
                    seen[mount.name] = stamp
