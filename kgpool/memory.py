"""Kernel memory: what each kernel of a pool costs, read from /proc/<pid>/smaps_rollup; kernels
past --max-kernel-memory are replaced gracefully; with --fork, a warning when the workers'
private memory shows that sharing the template's pages saves nothing.

The limit is on *private* memory (Private_Clean + Private_Dirty, the USS): the pages no other
process maps, i.e. what replacing the kernel gives back. RSS would count a forked worker's
shared copy of the template's state in full (every worker would look as large as the template);
PSS charges each process a share of the pages it shares, so a worker's PSS falls as more workers
share them and rises when one leaves: a limit on it would recycle kernels because the pool
shrank. Private memory is what a worker added by itself (pages it wrote to, copied from the
template) and, for a classic kernel, nearly all of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from .pool import KernelPool, Lease

log = logging.getLogger(__name__)

INTERVAL = 2.0  # seconds between samples (reading smaps_rollup takes about a millisecond)
MIB = 2**20
# A worker whose private memory reaches this share of the template's state (what the init cells
# added) after serving has copied most of it: the state is object-heavy (reference counts are
# written on every object a request touches), so --fork saves little.
OBJECT_HEAVY_SHARE = 0.5
OBJECT_HEAVY_MIN = 32 * MIB  # smaller states are not worth a warning

# (slot label, private bytes, pss bytes) for each process sampled
Report = Callable[[dict[str, tuple[int, int]]], None]


@dataclass(frozen=True)
class Usage:
    private: int  # Private_Clean + Private_Dirty
    pss: int
    rss: int


@dataclass(frozen=True)
class TemplateInfo:
    version: int
    pid: int
    state: int  # bytes of resident memory its init cells added


def usage(pid: int) -> Usage | None:
    """The process's memory, or None if it is gone (or /proc cannot tell)."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
            for line in rollup:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    fields[name] = int(parts[0]) * 1024
    except (OSError, ValueError):
        return None
    if "Pss" not in fields:
        return None
    return Usage(fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
                 fields["Pss"], fields.get("Rss", 0))


def _sample(pids: list[int]) -> dict[int, Usage]:
    found = {}
    for pid in pids:
        use = usage(pid)
        if use is not None:
            found[pid] = use
    return found


class MemoryWatch:
    """Samples a pool's kernels (and its --fork templates) every INTERVAL seconds."""

    def __init__(self, pool: KernelPool, *, limit: int, report: Report,
                 templates: Callable[[], list[TemplateInfo]] = list, name: str = "") -> None:
        self._pool, self._limit, self._report = pool, limit, report
        self._templates, self._name = templates, name
        self._warned: set[int] = set()  # versions already called object-heavy

    async def run(self, interval: float = INTERVAL, first: bool = False) -> None:
        if first:
            await self.check()
        while True:
            await asyncio.sleep(interval)
            await self.check()

    async def check(self) -> None:
        leases = [lease for lease in self._pool.members() if lease.kernel.pid is not None]
        templates = self._templates()
        pids = [lease.kernel.pid for lease in leases] + [t.pid for t in templates]
        found = await asyncio.to_thread(_sample, [pid for pid in pids if pid is not None])
        samples: dict[str, tuple[int, int]] = {}
        for template in templates:
            use = found.get(template.pid)
            if use is not None:
                private, pss = samples.get("template", (0, 0))
                samples["template"] = (private + use.private, pss + use.pss)
        for lease in leases:
            use = found.get(lease.kernel.pid or 0)
            if use is None:
                continue
            private, pss = samples.get(str(lease.slot), (0, 0))  # and its replacement
            samples[str(lease.slot)] = (private + use.private, pss + use.pss)
            self._recycle(lease, use)
            self._object_heavy(lease, use, templates)
        self._report(samples)

    def _recycle(self, lease: Lease, use: Usage) -> None:
        if not self._limit or use.private <= self._limit or lease.retiring or lease.stopped:
            return
        log.warning("kernel slot %d (pid %s) has %.0f MiB of private memory, more than "
                    "--max-kernel-memory (%.0f MiB): replacing it", lease.slot,
                    lease.kernel.pid, use.private / MIB, self._limit / MIB)
        self._pool.recycle(lease, "memory")

    def _object_heavy(self, lease: Lease, use: Usage, templates: list[TemplateInfo]) -> None:
        template = next((t for t in templates if t.version == lease.version), None)
        if template is None or lease.served < 1 or lease.version in self._warned or \
                template.state < OBJECT_HEAVY_MIN or \
                use.private < OBJECT_HEAVY_SHARE * template.state:
            return
        self._warned.add(lease.version)
        log.warning(
            "%s: --fork saves little memory here: worker slot %d has %.0f MiB of private "
            "memory after %d request(s), %.0f%% of the %.0f MiB the init cells built in the "
            "template. The state is object-heavy: every Python object a request touches has "
            "its reference count written, which copies its page into the worker (gc.freeze() "
            "spares it the collector's writes only). State held in large buffers (numpy "
            "arrays, bytes, memory maps) is shared; without --fork each kernel costs its own "
            "copy anyway", self._name or "notebook", lease.slot, use.private / MIB,
            lease.served, 100 * use.private / template.state, template.state / MIB)
