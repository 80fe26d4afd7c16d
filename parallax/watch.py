"""``parallax metrics``: ask every stage over NATS for its series and print them as one Prometheus
exposition (what the gateway's ``/metrics?cluster=1`` adds to its own).

Errors are raised (``parallax``'s main prints one line): NATS unreachable exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.aio.client import Client as NATS

from parallax.broker import subjects
from parallax.broker.errors import UsageError
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
