"""Test helpers for child processes: waiting for a PID to go, killing a parent to orphan its child."""

from __future__ import annotations

import subprocess
import sys
import time

from parallax.procs import pid_alive


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def child_dies_with_parent(code: str) -> bool:
    """Run ``code`` in a parent python that prints its child's PID, SIGKILL the parent, and say
    whether the child went away on its own."""
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert pid_alive(child)
        parent.kill()
        parent.wait(10)
        return wait_gone(child)
    finally:
        if parent.poll() is None:
            parent.kill()
