"""The one thread of a stage process that runs its compute: loading (kernel tuning, warm-up), the KV
pool's allocation and every engine step.

OpenMP (libgomp, under torch and numba) keeps a team of worker threads per thread that starts
parallel regions, and when its threads outnumber the CPUs it throttles their spinning to ~100 spins,
so every parallel region has to wake sleeping workers. A stage that loaded in one thread and stepped
in another had two teams: one SmolLM2 Q4_1 decode step took 20-24 ms instead of 10.3 (2-core AMD EPYC,
avx512_bf16, 2 threads). So everything torch or numba computes in a stage runs here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

from .cores import SharedCores

T = TypeVar("T")


class ComputeThread:
    def __init__(self, cores: SharedCores | None = None) -> None:
        """``cores``: the machine's cores, when this CPU stage shares them with other stages (``stages.cores``)."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parallax-compute")
        self._cores = cores

    async def step(self, fn: Callable[[], T]) -> T:
        """An engine step, ``fn()`` in the compute thread, holding its threads' worth of cores if it shares them.
        Released before the step's messages go out, so that the next stage never waits for it."""
        return await self.run(fn if self._cores is None else partial(self._holding_cores, fn))

    def _holding_cores(self, fn: Callable[[], T]) -> T:
        if self._cores.acquire():
            time.sleep(0.001)  # waited: the rows sent meanwhile land in the engine's inbox and join this step
        try:
            return fn()
        finally:
            self._cores.release()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the compute thread, awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
