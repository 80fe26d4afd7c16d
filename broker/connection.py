"""One way to connect to NATS: a bounded first connect, endless reconnects after, one-line logs."""

from __future__ import annotations

import asyncio
import logging

import nats
from nats.aio.client import Client as NATS

from .errors import NatsUnreachable

log = logging.getLogger(__name__)
FIRST_CONNECT_S = 10.0


async def connect(url: str, name: str, first_connect_s: float = FIRST_CONNECT_S, **options) -> NATS:
    """Connect within ``first_connect_s``; once connected, reconnect forever (stages outlive blips)."""

    async def on_error(e: Exception) -> None:
        log.warning("NATS %s: %s", url, e or type(e).__name__)

    async def on_disconnect() -> None:
        log.warning("NATS %s: disconnected, reconnecting", url)

    async def on_reconnect() -> None:
        log.info("NATS %s: reconnected", url)

    try:
        return await asyncio.wait_for(
            nats.connect(
                url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=on_error,
                disconnected_cb=on_disconnect, reconnected_cb=on_reconnect, **options,
            ),
            first_connect_s,
        )
    except (asyncio.TimeoutError, OSError, nats.errors.Error) as e:
        raise NatsUnreachable(f"cannot reach NATS at {url} within {first_connect_s:.0f} s ({type(e).__name__})") from None
