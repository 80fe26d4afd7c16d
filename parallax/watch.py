"""``parallax metrics``: ask every stage over NATS for its series and print them as one Prometheus
exposition (what the gateway's ``/metrics?cluster=1`` adds to its own).
``parallax evict NODE``: delete a ghost's record (a node whose heartbeat stopped but whose key stayed)
from the registry.

Errors are raised (``parallax``'s main prints one line): NATS unreachable or bad input exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.aio.client import Client as NATS

from parallax.broker import subjects
from parallax.broker.errors import RegistryError, UsageError
from parallax.broker.observe import gather

T = TypeVar("T")


def add_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats", metavar="URL", default="nats://127.0.0.1:4222", help="NATS server")
    parser.add_argument("--wait", type=float, default=1.0, metavar="S",
                        help="seconds to wait for the stages' answers (default %(default)g)")


async def _with_nats(url: str, timeout_s: float, work: Callable[[NATS], Awaitable[T]]) -> T:
    from parallax.broker.connection import connect

    connection_log = logging.getLogger("parallax.broker.connection")
    level = connection_log.level
    connection_log.setLevel(logging.ERROR)  # no per-attempt warnings: the error is the one line
    try:
        nc = await connect(url, name="parallax-cli", first_connect_s=timeout_s)
    finally:
        connection_log.setLevel(level)
    try:
        return await work(nc)
    finally:
        await nc.close()


def _check_wait(args: argparse.Namespace) -> None:
    if not 0 < args.wait <= 60:
        raise UsageError(f"--wait must be in (0, 60] seconds, got {args.wait}")


def run_metrics(args: argparse.Namespace) -> int:
    """Print every stage's series (nothing but a comment when no stage answers)."""
    from parallax.gateway.metrics import merge_expositions

    _check_wait(args)
    texts = asyncio.run(_with_nats(args.nats, 5.0, lambda nc: gather(nc, subjects.METRICS, wait_s=args.wait)))
    if not texts:
        print(f"# no stage answered on {subjects.METRICS} within {args.wait:g} s", file=sys.stderr)
        return 0
    sys.stdout.write(merge_expositions(texts).decode())
    return 0


async def evict(nc: NATS, node_id: str, force: bool = False, now: float | None = None) -> list[str]:
    """Delete every record of ``node_id`` (``stage.``/``gateway.``/``scheduler.<id>``); the keys deleted.
    UsageError when there is none, or when it still heartbeats (unless ``force``)."""
    from parallax.broker.kv import KINDS, nodes_bucket, parse_node, snapshot
    from parallax.broker.registry import node_key
    from parallax.status import STALE_S

    kv = await nodes_bucket(nc)
    records = await snapshot(kv)
    keys = [key for key in (node_key(kind, node_id) for kind in KINDS) if key in records]
    if not keys:
        raise UsageError(f"no node {node_id!r} in the registry (see `parallax status`)")
    now = time.time() if now is None else now
    for key in keys:
        info = parse_node(records[key])
        age = None if info is None else now - info.updated
        if age is not None and age <= STALE_S and not force:
            raise UsageError(f"{key} is alive (last heartbeat {age:.1f} s ago): stop that node instead, or "
                             "pass --force")
    for key in keys:
        try:
            await kv.delete(key)
        except Exception as e:  # noqa: BLE001 -- JetStream API errors: one line
            raise RegistryError(f"cannot delete {key}: {type(e).__name__}: {e}") from None
    return keys


def run_evict(args: argparse.Namespace) -> int:
    keys = asyncio.run(_with_nats(args.nats, 5.0, lambda nc: evict(nc, args.node, args.force)))
    print(f"evicted {', '.join(keys)}")
    return 0
