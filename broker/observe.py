"""What operators ask of every stage at once, and the trace context a request carries.

:func:`gather` publishes one request (``parallax.metrics``, ``parallax.trace``, ...) with a reply inbox
and collects every answer for a short window (stages answer independently; there is no list of who
must answer). A request's trace context is W3C ``traceparent`` (``00-<trace id>-<span id>-<flags>``):
the gateway takes it from the HTTP request or makes a new one; it travels in the NATS header
``Px-Trace`` of every forward message as ``<rid>=<traceparent>`` pairs (one message may batch several
requests), so every stage learns the trace of every request it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from contextvars import ContextVar
from dataclasses import dataclass

from nats.aio.client import Client as NATS

GATHER_S = 0.5  # how long a scatter-gather waits for answers (less once ``expected`` answered)
TRACE_HEADER = "Px-Trace"
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


async def gather(nc: NATS, subject: str, payload: bytes = b"", wait_s: float = GATHER_S,
                 expected: int | None = None) -> list[bytes]:
    """Every answer to ``payload`` on ``subject`` within ``wait_s`` (sooner once ``expected`` came)."""
    replies: list[bytes] = []
    enough = asyncio.Event()

    async def on_reply(msg) -> None:
        replies.append(msg.data)
        if expected is not None and len(replies) >= expected:
            enough.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(subject, payload, reply=inbox)
        await nc.flush()
        if expected != 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(enough.wait(), wait_s)
    finally:
        await sub.unsubscribe()
    return list(replies)


@dataclass(frozen=True)
class TraceContext:
    """One hop's W3C trace context: the request's trace id and the span that sent it."""

    trace_id: str  # 32 lowercase hex digits, not all zero
    span_id: str  # 16 lowercase hex digits, not all zero
    flags: str = "01"  # sampled

    @classmethod
    def new(cls) -> "TraceContext":
        return cls(secrets.token_hex(16), secrets.token_hex(8))

    @classmethod
    def parse(cls, value: str | None) -> "TraceContext | None":
        """A ``traceparent`` value, or None when it is missing or invalid (W3C: then start a new trace)."""
        match = _TRACEPARENT.match((value or "").strip().lower())
        if match is None:
            return None
        version, trace_id, span_id, flags = match.groups()
        if version == "ff" or trace_id == "0" * 32 or span_id == "0" * 16:
            return None
        return cls(trace_id, span_id, flags)

    def child(self) -> "TraceContext":
        """The context a hop sends on: same trace, a new span id."""
        return TraceContext(self.trace_id, secrets.token_hex(8), self.flags)

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


# The trace of the HTTP request being served (the gateway's middleware sets it; the pipeline reads it).
current_trace: ContextVar[TraceContext | None] = ContextVar("parallax_trace", default=None)


def trace_header(traces: dict[str, TraceContext]) -> dict[str, str]:
    """NATS headers naming each request's trace context (empty when there is none)."""
    if not traces:
        return {}
    return {TRACE_HEADER: ",".join(f"{rid}={ctx.traceparent}" for rid, ctx in traces.items())}


def parse_trace_header(headers: dict[str, str] | None) -> dict[str, TraceContext]:
    """The ``{rid: TraceContext}`` of a message's headers; malformed pairs are skipped."""
    value = (headers or {}).get(TRACE_HEADER)
    if not value:
        return {}
    traces: dict[str, TraceContext] = {}
    for pair in value.split(","):
        rid, _, parent = pair.partition("=")
        ctx = TraceContext.parse(parent)
        if rid and ctx is not None:
            traces[rid.strip()] = ctx
    return traces
