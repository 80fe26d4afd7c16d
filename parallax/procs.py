"""Child processes that live and die with their parent, stopped by PID (never by name).

Every child gets ``PR_SET_PDEATHSIG=SIGTERM`` (Linux), so it dies when the process that spawned it
dies, even by SIGKILL. Spawn from the main thread: Linux ties the signal to the spawning *thread*.
Children run in their own session, so a Ctrl-C in the terminal reaches only the parent, which then
stops them in order (SIGTERM, a grace period, then SIGKILL). The grace period covers a stage's
drain (SIGTERM: running requests finish first, up to ``DRAIN_TIMEOUT_S``).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field

from parallax.broker.registry import DRAIN_TIMEOUT_S
from parallax.broker.server import pdeathsig_preexec

STOP_GRACE_S = DRAIN_TIMEOUT_S + 10.0  # a draining stage's longest wait, then its exit


@dataclass
class Child:
    name: str
    cmd: list[str]
    proc: subprocess.Popen = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()


def spawn(name: str, cmd: list[str], env: dict[str, str] | None = None, **popen_kwargs) -> Child:
    """Start ``cmd`` as a child that gets SIGTERM when this process dies."""
    if not cmd:
        raise ValueError(f"empty command for child {name!r}")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        cmd,
        env=full_env,
        stdin=subprocess.DEVNULL,
        preexec_fn=pdeathsig_preexec,
        start_new_session=True,
        **popen_kwargs,
    )
    return Child(name, list(cmd), proc)


class ProcessGroup:
    """A set of named children started together and stopped together."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None, **popen_kwargs) -> Child:
        child = spawn(name, cmd, env, **popen_kwargs)
        self.children.append(child)
        return child

    @property
    def pids(self) -> list[int]:
        return [child.pid for child in self.children]

    def exited(self) -> Child | None:
        """The first child that has exited, if any."""
        return next((child for child in self.children if child.returncode is not None), None)

    def stop_all(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM every child (newest first), wait up to ``grace`` seconds in all, SIGKILL the rest."""
        alive = [child for child in reversed(self.children) if child.returncode is None]
        for child in alive:
            _signal(child, kill=False)
        deadline = time.monotonic() + grace
        for child in alive:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(child, kill=True)
        for child in alive:
            try:
                child.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def _signal(child: Child, kill: bool) -> None:
    try:
        child.proc.kill() if kill else child.proc.terminate()
    except ProcessLookupError:
        pass


def pid_alive(pid: int) -> bool:
    """True while a process with this PID exists and is not a zombie."""
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
