"""Stages on one machine share its cores a step at a time.

Two CPU stages of 2 threads each on a 2-core machine (``parallax up --stages 2``) whose steps overlap run 4
OpenMP threads on 2 cores: every parallel region waits for a descheduled thread. Measured (SmolLM2 bf16, 16
streams, 2-core AMD EPYC): 200 tok/s against 299 for one stage of 2 threads. So a CPU stage holds as many of
the machine's cores as it has threads while it steps (``flock`` on a file per core, in the temp folder, per
user): steps that would overlap take turns instead (2 stages of 2 threads on 2 cores), and stages of 1 thread
each still run side by side. A stage that had to wait lets the messages sent meanwhile land before it steps, so
rows that come back together are stepped together. The thread count never changes, so neither do the results. A
process that dies drops its locks (its files stay open for its life: one descriptor per core).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from pathlib import Path


def cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class SharedCores:
    """``acquire()`` ``threads`` of this machine's cores (waits while fewer are free), ``release()`` them. A core is
    a lock file shared by every stage of this user here, whatever its thread count."""

    def __init__(self, threads: int, folder: Path | None = None):
        cores = cpu_count()
        folder = folder or Path(tempfile.gettempdir()) / f"parallax-cores-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        self._fds = [os.open(folder / f"core-{i}", os.O_CREAT | os.O_RDWR, 0o600) for i in range(cores)]
        self.threads = min(max(1, threads), cores)
        self._held: list[int] = []

    def acquire(self) -> bool:
        """Hold ``threads`` cores; True if it had to wait for them."""
        waited = False
        while True:
            for fd in self._fds:
                if len(self._held) < self.threads and _try_lock(fd):
                    self._held.append(fd)
            if len(self._held) == self.threads:
                return waited
            self.release()
            waited = True
            if self.threads == len(self._fds):  # every core: wait for each in order (no two stages deadlock)
                for fd in self._fds:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                self._held = list(self._fds)
                return True
            time.sleep(0.0005)  # some: look again for whichever free first

    def release(self) -> None:
        for fd in self._held:
            fcntl.flock(fd, fcntl.LOCK_UN)
        self._held = []


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
