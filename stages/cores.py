"""Stages on one machine share its cores a step at a time.

Two CPU stages of 2 threads each on a 2-core machine (``parallax up --stages 2``) whose steps overlap run 4
OpenMP threads on 2 cores: every parallel region waits for a descheduled thread. Measured (SmolLM2 bf16, 16
streams, 2-core AMD EPYC): 200 tok/s against 299 for one stage of 2 threads. So a CPU stage holds a *slot* of
its thread count's cores while it steps (``flock`` on a file per slot, in the temp folder, per user): with slots = cores // threads, steps that would overlap take turns instead (2 stages of 2
threads on 2 cores: one slot), and stages of 1 thread each still run side by side. A stage that had to wait
lets the messages sent meanwhile land before it steps, so rows that come back together are stepped together.
The thread count never changes, so neither do the results. A process that dies drops its locks (its files
stay open for its life: a few descriptors).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from pathlib import Path


def cpu_count() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class CoreSlots:
    """``acquire()`` one slot of this machine's cores (waits for one when all are taken), ``release()`` it."""

    def __init__(self, threads: int, folder: Path | None = None):
        count = max(1, cpu_count() // max(1, threads))
        folder = folder or Path(tempfile.gettempdir()) / f"parallax-cores-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        self._fds = [os.open(folder / f"slot-{i}-of-{count}", os.O_CREAT | os.O_RDWR, 0o600) for i in range(count)]
        self._held: int | None = None

    def acquire(self) -> bool:
        """Hold a slot; True if it had to wait for one."""
        waited = False
        while True:
            for fd in self._fds:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                self._held = fd
                return waited
            waited = True
            if len(self._fds) == 1:  # one slot: wait on it
                fcntl.flock(self._fds[0], fcntl.LOCK_EX)
                self._held = self._fds[0]
                return True
            time.sleep(0.0005)  # several: look again for whichever frees first

    def release(self) -> None:
        if self._held is not None:
            fcntl.flock(self._held, fcntl.LOCK_UN)
            self._held = None
