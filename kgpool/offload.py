"""Large messages are encoded and decoded in a helper process, so the event loop never stalls.

JSON of a 10 MiB body takes a few hundred milliseconds of CPU in C code that holds the GIL: in
a thread it would still stop every other request. Past THRESHOLD bytes the work goes to one
helper process (started on first use, with the spawn method: nothing of the server's state is
inherited); the loop only waits for the answer. Below it, the work is done in place: small
messages are the fast path.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

T = TypeVar("T")
THRESHOLD = 256 * 1024  # bytes of input worth a trip to the helper process


class Offload:
    """Runs a pure function here or in the helper process, by the size of its input."""

    def __init__(self, threshold: int = THRESHOLD) -> None:
        self.threshold = threshold
        self._pool: ProcessPoolExecutor | None = None

    async def run(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args), in the helper process when `size` (of the input) is past the
        threshold. fn and its arguments must be picklable (module-level, plain data)."""
        if size < self.threshold:
            return fn(*args)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1,
                                             mp_context=multiprocessing.get_context("spawn"))
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except BrokenProcessPool:
            self._pool = None  # the helper died (OOM?): a new one next time; this one here
            return fn(*args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def loads(data: bytes) -> Any:
    """json.loads, surrogate escapes kept (kernels encode lone surrogates that way)."""
    return json.loads(data.decode("utf-8", "surrogateescape"))
