"""Scatter-gather of the stages' ``parallax.stats`` replies over NATS, tolerant of silence.

A request goes to ``parallax.stats`` with a reply inbox; every stage answers with a JSON object
(``node_id, start, end, steps, busy_s, hop_ms{count,p50,p99,mean}, kv{...}, prefix_hit_tokens,
rss_bytes``). Stages that do not answer, or answer without some keys, show up as "n/a".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson

STATS_SUBJECT = "parallax.stats"
GATHER_S = 0.5


class StatsClient:
    """A NATS connection (or none) that asks every stage for its counters."""

    def __init__(self, nc: Any | None, expected: int | None = None) -> None:
        self._nc = nc
        self._expected = expected

    @property
    def connected(self) -> bool:
        return self._nc is not None

    async def reset(self) -> list[dict[str, Any]]:
        return await self.gather({"reset": True})

    async def collect(self, wait_s: float = GATHER_S) -> list[dict[str, Any]]:
        return await self.gather({}, wait_s)

    async def gather(self, payload: dict[str, Any], wait_s: float = GATHER_S) -> list[dict[str, Any]]:
        """Every reply within ``wait_s`` (sooner once the expected number of stages answered)."""
        if self._nc is None:
            return []
        replies: list[dict[str, Any]] = []
        enough = asyncio.Event()

        async def on_reply(msg: Any) -> None:
            reply = parse_reply(msg.data)
            if reply is not None:
                replies.append(reply)
            if self._expected and len(replies) >= self._expected:
                enough.set()

        try:
            inbox = self._nc.new_inbox()
            sub = await self._nc.subscribe(inbox, cb=on_reply)
            try:
                await self._nc.publish(STATS_SUBJECT, orjson.dumps(payload), reply=inbox)
                await self._nc.flush()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(enough.wait(), wait_s)
            finally:
                await sub.unsubscribe()
        except Exception as exc:  # noqa: BLE001 -- a broken connection must not end the benchmark
            print(f"bench: stats request failed: {type(exc).__name__}: {exc}")
        return replies


@contextlib.asynccontextmanager
async def stats_client(nats_url: str | None, expected: int | None) -> AsyncIterator[StatsClient]:
    """A connected StatsClient, or a silent one when there is no URL or no server."""
    nc = None
    if nats_url:
        import nats

        try:
            nc = await nats.connect(nats_url, connect_timeout=3, max_reconnect_attempts=0, allow_reconnect=False)
        except Exception as exc:  # noqa: BLE001 -- no stats, but the benchmark goes on
            print(f"bench: no NATS stats ({nats_url}: {type(exc).__name__}: {exc})")
    try:
        yield StatsClient(nc, expected)
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()


def parse_reply(data: bytes) -> dict[str, Any] | None:
    try:
        reply = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return reply if isinstance(reply, dict) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def stage_label(reply: dict[str, Any]) -> str:
    start, end = reply.get("start"), reply.get("end")
    if isinstance(start, int) and isinstance(end, int):
        return f"{start}:{end}"
    return str(reply.get("node_id", "?"))


def hop_p50_ms(reply: dict[str, Any]) -> float | None:
    hop = reply.get("hop_ms")
    return _number(hop.get("p50")) if isinstance(hop, dict) else None


def kv_field(reply: dict[str, Any], key: str) -> float | None:
    kv = reply.get("kv")
    return _number(kv.get(key)) if isinstance(kv, dict) else None


def stage_summary(reply: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """One stage's numbers for a window of ``wall_s`` seconds."""
    busy = _number(reply.get("busy_s"))
    return {
        "stage": stage_label(reply),
        "node_id": reply.get("node_id"),
        "busy_frac": busy / wall_s if busy is not None and wall_s > 0 else None,
        "hop_p50_ms": hop_p50_ms(reply),
        "steps": _number(reply.get("steps")),
        "rows": _number(reply.get("rows")),
        "rss_bytes": _number(reply.get("rss_bytes")),
        "kv_budget_bytes": kv_field(reply, "budget_bytes"),
        "kv_blocks_used": kv_field(reply, "blocks_used"),
        "kv_blocks_total": kv_field(reply, "blocks_total"),
        "prefix_hit_tokens": _number(reply.get("prefix_hit_tokens")),
        "raw": reply,
    }


def summarize_stages(replies: Sequence[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Per-stage summaries (sorted by layer range) and the worst stage's hop p50."""
    stages = sorted((stage_summary(r, wall_s) for r in replies), key=lambda s: (stage_sort_key(s["stage"]), str(s["node_id"])))
    hops = [s["hop_p50_ms"] for s in stages if s["hop_p50_ms"] is not None]
    return {"stages": stages, "nats_hop_p50_ms": max(hops) if hops else None}


def stage_sort_key(label: str) -> tuple[int, str]:
    """Layer ranges by their first layer, other labels after them."""
    head = label.split(":", 1)[0]
    return (int(head), label) if head.isdigit() else (1 << 30, label)


def merge_peaks(peaks: dict[str, dict[str, Any]], replies: Sequence[dict[str, Any]]) -> None:
    """Keep, per node, the largest rss_bytes and kv blocks_used seen so far (and the latest reply)."""
    for reply in replies:
        key = str(reply.get("node_id", stage_label(reply)))
        entry = peaks.setdefault(key, {"peak_rss_bytes": None, "peak_kv_blocks_used": None})
        entry["peak_rss_bytes"] = _max(entry["peak_rss_bytes"], _number(reply.get("rss_bytes")))
        entry["peak_kv_blocks_used"] = _max(entry["peak_kv_blocks_used"], kv_field(reply, "blocks_used"))
        entry["last"] = reply


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


async def poll_peaks(stats: StatsClient, peaks: dict[str, dict[str, Any]], every_s: float, stop: asyncio.Event) -> None:
    """Sample the stages every ``every_s`` seconds until ``stop`` is set."""
    while not stop.is_set():
        started = time.perf_counter()
        merge_peaks(peaks, await stats.collect(wait_s=min(every_s, 2.0)))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, every_s - (time.perf_counter() - started)))
