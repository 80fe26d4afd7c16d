"""Stopping asyncio tasks that run nats-py code.

On Python 3.11, ``asyncio.wait_for`` (which nats-py uses in flushes, requests and KV watchers)
swallows a cancellation that arrives just as the awaited thing completes; a task cancelled once
may then run on forever, and whoever awaits it hangs. :func:`stop_task` cancels until it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)


async def stop_task(task: asyncio.Task, every_s: float = 0.2) -> None:
    """Cancel ``task`` (again every ``every_s`` if it shrugs the cancellation off) and wait for it;
    its exception, if any, is logged, not raised."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every_s)
    if not task.cancelled() and task.exception() is not None:
        with contextlib.suppress(Exception):
            log.debug("task %s ended with %r", task.get_name(), task.exception())
