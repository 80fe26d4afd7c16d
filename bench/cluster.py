"""Start ``parallax up`` as a child process, wait for ``/health``, and stop it (and its children) by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from parallax.broker.errors import ParallaxError
from parallax.broker.server import free_port

from parallax.procs import ProcessGroup, pid_alive

READY_TIMEOUT_S = 300.0
STOP_GRACE_S = 20.0  # stopped when no request runs: `parallax up`'s stages exit at once (their drain waits only for running requests)
POLL_S = 0.5


class ClusterError(ParallaxError):
    """The cluster did not come up."""


@dataclass(frozen=True)
class ClusterSpec:
    model: str
    stages: int
    dtype: str
    extra_args: tuple[str, ...] = ()
    ready_timeout_s: float = READY_TIMEOUT_S


@dataclass
class Endpoint:
    """Where the benchmark sends requests; ``pids`` lists every process of a cluster it started."""

    url: str
    nats_url: str | None
    stages: int | None = None
    pids: list[int] = field(default_factory=list)
    log_path: Path | None = None


def distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def up_command(spec: ClusterSpec, port: int, nats_port: int) -> list[str]:
    return [sys.executable, "-m", "parallax.cli", "up", "--model", spec.model, "--stages", str(spec.stages),
            "--dtype", spec.dtype, "--port", str(port), "--nats-port", str(nats_port), *spec.extra_args]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def log_tail(path: Path | None, chars: int = 2000) -> str:
    if path is None or not path.is_file():
        return ""
    return path.read_text(errors="replace")[-chars:]


def wait_healthy(url: str, group: ProcessGroup, timeout_s: float, log_path: Path | None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        child = group.exited()
        if child is not None:
            raise ClusterError(f"{child.name} exited with code {child.returncode}:\n{log_tail(log_path)}")
        if healthy(url):
            return
        time.sleep(POLL_S)
    raise ClusterError(f"{url}/health not 200 after {timeout_s:.0f} s:\n{log_tail(log_path)}")


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux /proc), children before grandchildren."""
    found: list[int] = []
    queue = [pid]
    while queue:
        parent = queue.pop(0)
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                found.extend(kids)
                queue.extend(kids)
    return found


def reap(pids: Sequence[int], grace_s: float = 5.0) -> list[int]:
    """Wait for these processes (ours) to exit, SIGKILL by PID whatever is left; returns the killed."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    killed = [p for p in pids if pid_alive(p)]
    for pid in killed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return killed


@contextlib.contextmanager
def running_cluster(spec: ClusterSpec, log_path: Path) -> Iterator[Endpoint]:
    """``parallax up`` on free ports, its output in ``log_path``; always stopped on exit."""
    port, nats_port = distinct_free_ports(2)
    url = f"http://127.0.0.1:{port}"
    endpoint = Endpoint(url, f"nats://127.0.0.1:{nats_port}", spec.stages, log_path=log_path)
    group = ProcessGroup()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        try:
            child = group.spawn("parallax up", up_command(spec, port, nats_port), stdout=log, stderr=subprocess.STDOUT)
            endpoint.pids.append(child.pid)
            wait_healthy(url, group, spec.ready_timeout_s, log_path)
            endpoint.pids.extend(descendants(child.pid))
            yield endpoint
        finally:
            known = set(endpoint.pids)
            endpoint.pids.extend(p for c in group.children for p in descendants(c.pid) if p not in known)
            _stop(group, endpoint.pids)


def _stop(group: ProcessGroup, pids: Sequence[int]) -> None:
    """SIGTERM ``parallax up`` (it stops its children), then make sure every known PID is gone.
    A second Ctrl-C during this must not cut the cleanup short."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        group.stop_all(grace=STOP_GRACE_S)
        killed = reap(pids)
        if killed:
            print(f"bench: killed leftover cluster processes {killed}", file=sys.stderr)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
