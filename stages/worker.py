"""A stage worker: NATS subscriptions around one :class:`Engine`.

Subscribes to its layer range (queue group shared with replicas), to its own pinned subject, to the
model's release broadcast and to discovery; publishes a heartbeat. Malformed messages are logged and
answered (when they carry a reply subject), never fatal.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import statistics
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import orjson
import psutil

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from parallax import __version__
from parallax.broker import chunks, subjects
from parallax.broker.connection import connect
from parallax.broker.errors import WireError
from parallax.broker.wire import ErrorMsg, Forward, Release, decode, encode
from parallax.scheduler.registry import HEARTBEAT_INTERVAL_S, NodeInfo

from .backend import Backend
from .engine import Engine, EngineConfig, Stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    nats_url: str = "nats://127.0.0.1:4222"
    node_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}")
    heartbeat_s: float = HEARTBEAT_INTERVAL_S

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be positive")
        subjects.token(self.node_id)


class StageWorker:
    def __init__(self, backend: Backend, config: WorkerConfig, engine_config: EngineConfig | None = None):
        self.backend, self.config = backend, config
        self.spec = backend.spec
        self.engine = Engine(backend, config.node_id, engine_config)
        self._wake = asyncio.Event()
        self._reassembler = chunks.Reassembler()
        self._hops_ms: deque[float] = deque(maxlen=20_000)
        self.nc: NATS | None = None

    @property
    def info(self) -> NodeInfo:
        s = self.spec
        return NodeInfo(
            node_id=self.config.node_id, model=s.model, start=s.start, end=s.end, num_layers=s.num_layers,
            host=socket.gethostname(), device=s.device, dtype=s.dtype, version=__version__,
            running=len(self.engine.seqs), queued=self.engine.queued,
        )

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set; says goodbye so gateways drop this node at once."""
        self.nc = await connect(self.config.nats_url, name=f"parallax-stage-{self.config.node_id}")
        self.engine.fit_payload(self.nc.max_payload)
        await self._subscribe()
        tasks = [asyncio.create_task(self._engine_loop()), asyncio.create_task(self._heartbeat_loop())]
        log.info("stage %s serving layers %d:%d of %s on %s", self.config.node_id, self.spec.start,
                 self.spec.end, self.spec.model, self.config.nats_url)
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._goodbye()

    async def _subscribe(self) -> None:
        s, nc = self.spec, self.nc
        await nc.subscribe(subjects.layers(s.model, s.start, s.end), queue=subjects.layers_queue(s.model, s.start, s.end), cb=self._on_work)
        await nc.subscribe(subjects.node(s.model, s.start, s.end, self.config.node_id), cb=self._on_work)
        await nc.subscribe(subjects.release(s.model), cb=self._on_work)
        await nc.subscribe(subjects.DISCOVER, cb=self._on_discover)
        await nc.subscribe(subjects.STATS, cb=self._on_stats)
        await nc.flush()

    async def _on_work(self, msg: Msg) -> None:
        try:
            payload = self._reassembler.feed(msg.data, msg.headers)
            if payload is None:
                return
            header, data = decode(payload)
            if not isinstance(header, (Forward, Release)):
                raise WireError(f"a stage takes fwd or release messages, not {header.kind!r}")
        except WireError as e:
            log.warning("dropped malformed message on %s: %s", msg.subject, e)
            if msg.reply:
                await self.nc.publish(msg.reply, encode(ErrorMsg(message=f"malformed message: {e}", node=self.config.node_id)))
            return
        if isinstance(header, Forward) and header.sent is not None:
            self._hops_ms.append(max(0.0, (time.time() - header.sent) * 1000))
        self.engine.submit(header, data)
        self._wake.set()

    async def _on_discover(self, msg: Msg) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, self.info.model_dump_json().encode())

    async def _on_stats(self, msg: Msg) -> None:
        """Counters for benchmarks and operators; ``{"reset": true}`` zeroes them after answering."""
        if msg.reply:
            await self.nc.publish(msg.reply, orjson.dumps(self.stats()))
        try:
            reset = bool(msg.data) and orjson.loads(msg.data).get("reset") is True
        except (orjson.JSONDecodeError, AttributeError):
            reset = False
        if reset:
            self.engine.stats = Stats()
            self._hops_ms.clear()

    def stats(self) -> dict:
        e, s, hops = self.engine, self.engine.stats, sorted(self._hops_ms)
        blocks = e.blocks
        return {
            "node_id": self.config.node_id, "model": self.spec.model, "start": self.spec.start, "end": self.spec.end,
            "steps": s.steps, "rows": s.rows, "busy_s": s.busy_s, "prefix_hit_tokens": s.prefix_hit_tokens,
            "preempted": s.preempted, "running": len(e.seqs), "waiting": len(e.waiting),
            "hop_ms": _summary(hops),
            "kv": {"block_size": blocks.block_size, "blocks_total": blocks.num_blocks, "blocks_used": blocks.used,
                   "blocks_cached": blocks.cached, "budget_bytes": blocks.num_blocks * self.backend.kv_block_bytes(blocks.block_size)},
            "rss_bytes": psutil.Process().memory_info().rss,
        }

    async def _engine_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.engine.has_work():
                try:
                    outgoing = await asyncio.to_thread(self.engine.step)
                except Exception:  # the engine already guards the backend; this is a last resort
                    log.exception("engine step failed")
                    continue
                for subject, payload in outgoing:
                    await chunks.publish(self.nc, subject, payload)

    async def _heartbeat_loop(self) -> None:
        subject = subjects.heartbeat(self.spec.model, self.config.node_id)
        while True:
            await self.nc.publish(subject, self.info.model_dump_json().encode())
            await asyncio.sleep(self.config.heartbeat_s)

    async def _goodbye(self) -> None:
        if self.nc is None or self.nc.is_closed:
            return
        leaving = self.info.model_copy(update={"state": "leaving"})
        try:
            await self.nc.publish(subjects.heartbeat(self.spec.model, self.config.node_id), leaving.model_dump_json().encode())
            await self.nc.drain()
        except Exception as e:  # the server may already be gone
            log.debug("goodbye failed: %s", e)


def _summary(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "p50": None, "p99": None, "mean": None}
    return {"count": len(values), "p50": values[len(values) // 2], "p99": values[min(len(values) - 1, int(len(values) * 0.99))],
            "mean": statistics.fmean(values)}
