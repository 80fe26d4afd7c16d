"""A stage worker: NATS subscriptions around one :class:`Engine` serving one layer range.

Subscribes to its own subject for its layer range (the gateway pins every hop of a request to one
replica, so replicas share work through the gateway's routing), to the model's release broadcast
and to the stats, metrics and trace requests (``parallax.stats``, ``parallax.metrics``,
``parallax.trace``; see :mod:`.metrics` and :mod:`.trace`). Its :class:`NodeInfo` goes to the registry
(JetStream KV, :mod:`parallax.broker.kv`) every heartbeat. Malformed messages are logged and
answered (when they carry a reply subject), never fatal. :meth:`attach`/:meth:`detach` start and
stop serving on a connection someone else owns (a stage the scheduler moves to another range);
:meth:`run` does it all for a stage with a fixed range.

Drain (:meth:`run`'s ``drain``, SIGTERM): the stage refuses new requests at once (code ``draining``:
the gateway fails them with the reason); when another live stage serves the same range, its running
requests are handed back at once (they resume on that replica), otherwise they finish here, for up to
``drain_timeout_s``, after which the rest are handed back. ``stop`` (a second signal) hands everything
back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import statistics
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import psutil

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from parallax import __version__
from parallax.broker import chunks, subjects
from parallax.broker.connection import NatsOptions, connect
from parallax.broker.errors import WireError
from parallax.broker.kv import Presence, nodes_bucket, parse_node, snapshot
from parallax.broker.wire import ErrorMsg, Forward, Message, Release, encode
from parallax.broker.registry import DRAIN_TIMEOUT_S, HEARTBEAT_INTERVAL_S, Load, ModelProfile, NodeInfo, State

from . import micro
from .backend import Backend
from .compute import ComputeThread
from .engine import Engine, EngineConfig, Outgoing, Stats
from .grammar import Grammars
from .metrics import StageMetrics, serving
from .trace import SpanExport, TraceRecorder

log = logging.getLogger(__name__)
DRAIN_POLL_S = 0.5  # while draining, how often the registry is read for a replica of this range


@dataclass(frozen=True)
class WorkerConfig:
    nats: NatsOptions = NatsOptions()
    node_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}")
    heartbeat_s: float = HEARTBEAT_INTERVAL_S
    debug_delay_ms: float = 0.0  # sleep after every step: a slow node on purpose, for routing tests
    drain_timeout_s: float = DRAIN_TIMEOUT_S  # a drain lets running requests finish here for this long at most
    tokenizer_path: Path | None = None  # the model folder: its tokenizer compiles structured-output grammars (None: refused)
    export_spans: SpanExport | None = None  # also send every trace span here (OpenTelemetry: stages/otel.py)

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be positive")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must not be negative")
        if self.debug_delay_ms < 0:
            raise ValueError("debug_delay_ms must not be negative")
        subjects.token(self.node_id)


@dataclass(frozen=True)
class NodeFacts:
    """What a stage tells the registry besides its range and load."""

    memory_total: int = 0
    memory_offered: int = 0
    profile: ModelProfile | None = None
    manual: bool = True  # the range was given by hand (--layers)
    layer_ms: float | None = None  # estimate until steps are measured
    backend: str = "torch"  # the compute backend ("torch", "mlx")


def node_info(node_id: str, model: str, num_layers: int, device: str, dtype: str, facts: NodeFacts, state: State,
              layers: tuple[int, int] | None = None, load: Load = Load(), layer_ms: float | None = None,
              kernels: dict[str, str] | None = None, progress: float | None = None) -> NodeInfo:
    start, end = layers or (None, None)
    return NodeInfo(
        node_id=node_id, kind="stage", model=model, start=start, end=end, num_layers=num_layers,
        host=socket.gethostname(), backend=facts.backend, device=device, dtype=dtype, version=__version__, state=state,
        progress=progress, manual=facts.manual,
        memory_total=facts.memory_total, memory_offered=facts.memory_offered, layer_ms=layer_ms or facts.layer_ms,
        load=load, profile=facts.profile, kernels=kernels or {}, updated=time.time(),
    )


class StageWorker:
    def __init__(self, backend: Backend, config: WorkerConfig, engine_config: EngineConfig | None = None,
                 facts: NodeFacts = NodeFacts(), compute: ComputeThread | None = None):
        """Build it in ``compute``'s thread (its engine allocates the KV pool there), or in any thread when
        it makes its own."""
        self.backend, self.config, self.facts = backend, config, facts
        self.spec = backend.spec
        grammars = None if config.tokenizer_path is None else Grammars(config.tokenizer_path, self.spec.vocab_size)
        self.engine = Engine(backend, config.node_id, engine_config, grammars)
        self.metrics = StageMetrics(self.engine)
        labels = {"model": self.spec.model, "layers": f"{self.spec.start}:{self.spec.end}", "node": config.node_id}
        self.tracer = TraceRecorder(labels, config.export_spans)
        self.engine.observers += [self.metrics.step, self.tracer.step]
        self._wake = asyncio.Event()
        self._stopping = False
        self._reassembler = chunks.Reassembler()
        self._hops_ms: deque[float] = deque(maxlen=20_000)
        self._step_ms: float | None = None
        self._subs: list[Subscription] = []
        self._loop_task: asyncio.Task | None = None
        self.compute = compute or ComputeThread()  # the stage's one compute thread (stages/compute.py)
        self._owns_compute = compute is None
        self.nc: NATS | None = None
        self._service = None  # the nats.micro service while attached (stages/micro.py)

    def describe(self, state: State = "serving") -> NodeInfo:
        s, e = self.spec, self.engine
        load = Load(running=len(e.seqs), waiting=e.queued, kv_blocks_used=e.blocks.used, kv_blocks_total=e.blocks.num_blocks)
        layer_ms = None if self._step_ms is None else self._step_ms / (s.end - s.start)
        return node_info(self.config.node_id, s.model, s.num_layers, s.device, s.dtype, self.facts, state,
                         (s.start, s.end), load, layer_ms, self.backend.kernels)

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None,
                  drain: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (running requests are handed back at once) or ``drain`` is set
        (see :meth:`drain`), registered in the KV registry; a clean exit deletes the key."""
        nc = await connect(self.config.nats, name=f"parallax-stage-{self.config.node_id}")
        try:
            kv = await nodes_bucket(nc, self.config.nats.js_domain)
            await self.attach(nc)
            async with Presence(kv, self.describe, self.config.heartbeat_s):
                if ready is not None:
                    ready.set()
                await _first_set(stop, drain)
                await self.leave(kv, stop, drain)
        finally:
            await _close(nc)
            if self._owns_compute:
                self.compute.close()

    async def leave(self, kv: KeyValue, stop: asyncio.Event, drain: asyncio.Event | None) -> None:
        """Stop serving because the stage shuts down: after a drain (:meth:`drain`) when ``drain`` is
        set and ``stop`` is not, else at once (running requests are handed back)."""
        if drain is not None and drain.is_set() and not stop.is_set():
            await self.drain(kv, stop)
        await self.detach("the stage is shutting down")

    async def drain(self, kv: KeyValue, hurry: asyncio.Event) -> None:
        """Refuse new requests; return once the running ones can be handed back (another live stage
        serves this range), have finished, ``drain_timeout_s`` is over or ``hurry`` is set. Running
        requests keep this stage registered as serving, so their gateways keep waiting for them."""
        s, loop = self.spec, asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout_s
        draining = False
        while not self.engine.idle and not hurry.is_set():
            if (replica := await self._replica(kv)) is not None:
                log.info("draining: stage %s also serves layers %d:%d; handing %d requests back", replica, s.start, s.end,
                         len(self.engine.seqs))
                return
            if not draining:
                self.engine.draining = (f"stage {self.config.node_id} is shutting down and takes no new requests "
                                        f"for layers {s.start}:{s.end} (no other stage serves them)")
                draining = True
                log.info("draining: letting %d requests finish (at most %g s)", len(self.engine.seqs),
                         self.config.drain_timeout_s)
                continue  # check again: a replica may have come while no new request was refused
            if (left := deadline - loop.time()) <= 0:
                log.warning("drain timeout: handing %d requests back", len(self.engine.seqs))
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(hurry.wait(), min(DRAIN_POLL_S, left))

    async def _replica(self, kv: KeyValue) -> str | None:
        """Another live stage serving this stage's model and range, by node id, if any."""
        s = self.spec
        try:
            values = await snapshot(kv)
        except Exception as e:  # the registry unreachable: nobody to hand requests to
            log.warning("draining: cannot read the registry: %s: %s", type(e).__name__, e)
            return None
        for value in values.values():
            node = parse_node(value)
            if (node is not None and node.serves and node.node_id != self.config.node_id and node.model == s.model
                    and node.layers == (s.start, s.end)):
                return node.node_id
        return None

    async def attach(self, nc: NATS) -> None:
        """Start serving on ``nc``."""
        self.nc = nc
        self.engine.fit_payload(nc.max_payload)
        await self._subscribe()
        self._stopping = False
        self._loop_task = asyncio.create_task(self._engine_loop())
        serving(self.metrics, True)
        self._service = await micro.start(nc, self)
        log.info("stage %s serving layers %d:%d of %s", self.config.node_id, self.spec.start, self.spec.end, self.spec.model)

    async def detach(self, reason: str) -> None:
        """Stop serving: no new work, the step in progress completes, running requests are handed
        back to their gateways as ``preempted`` (they resume on another chain)."""
        serving(self.metrics, False)
        await micro.stop(self._service)
        self._service = None
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()
        if self._loop_task is not None:
            self._stopping = True
            self._wake.set()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        if self.nc is not None and not self.nc.is_closed:
            await self._publish(self.engine.evacuate(f"stage {self.config.node_id} left layers "
                                                     f"{self.spec.start}:{self.spec.end}: {reason}"))
            await self.nc.flush()

    async def _subscribe(self) -> None:
        s, nc = self.spec, self.nc
        self._subs = [
            await nc.subscribe(subjects.node(s.model, s.start, s.end, self.config.node_id), cb=self._on_work),
            await nc.subscribe(subjects.release(s.model), cb=self._on_work),
            await nc.subscribe(subjects.STATS, cb=self._on_stats),
            await nc.subscribe(subjects.METRICS, cb=self._on_metrics),
            await nc.subscribe(subjects.TRACE, cb=self._on_trace),
        ]
        await nc.flush()

    async def _on_work(self, msg: Msg) -> None:
        header = None
        self.metrics.received(len(msg.data))
        try:
            received = self._reassembler.receive(msg.data, msg.headers)
            if received is None:
                return
            header, data = received
            if not isinstance(header, (Forward, Release)):
                raise WireError(f"a stage takes fwd or release messages, not {header.kind!r}")
            if isinstance(header, Forward):
                self._check_ids(header, data)
        except WireError as e:
            log.warning("dropped malformed message on %s: %s", msg.subject, e)
            await self._refuse(msg.reply, header, f"malformed message: {e}")
            return
        now = time.time()
        if isinstance(header, Forward):
            self.tracer.received(header, msg.headers, now)
            if header.sent is not None:
                hop = max(0.0, now - header.sent)
                self._hops_ms.append(hop * 1000)
                self.metrics.hop(hop)
        else:
            self.tracer.forget(header.rids)
        self.engine.submit(header, data)
        self._wake.set()

    def _check_ids(self, header: Forward, data: memoryview) -> None:
        """A first stage's token ids must be in the vocabulary: the embedding of any other id fails the
        whole batch, requests of other clients included."""
        if not (self.spec.first and header.dtype == "int32"):
            return  # a wrong dtype or shape is the engine's to refuse (it answers the request)
        ids = np.frombuffer(data, dtype="<i4")  # [T]
        if ids.size and not (0 <= int(ids.min()) and int(ids.max()) < self.spec.vocab_size):
            raise WireError(f"token ids must be in 0..{self.spec.vocab_size - 1}, got {int(ids.min())}..{int(ids.max())}")

    async def _refuse(self, reply: str | None, header: Message | None, message: str) -> None:
        """Answer a message the stage dropped: on its reply subject, and to the gateway of every
        request it starts (which would otherwise wait for tokens in vain)."""
        node = self.config.node_id
        if reply:
            await self.nc.publish(reply, encode(ErrorMsg(message=message, node=node)))
        for item in header.items if isinstance(header, Forward) else ():
            if item.meta is not None:
                await self.nc.publish(item.meta.reply, encode(ErrorMsg(rid=item.rid, message=message, node=node)))

    async def _on_stats(self, msg: Msg) -> None:
        """Counters for benchmarks and operators; ``{"reset": true}`` zeroes them after answering."""
        if msg.reply:
            await self.nc.publish(msg.reply, orjson.dumps(self.stats()))
        try:
            reset = bool(msg.data) and orjson.loads(msg.data).get("reset") is True
        except (orjson.JSONDecodeError, AttributeError):
            reset = False
        if reset:
            self.metrics.absorb(self.engine.stats)
            self.engine.stats = Stats()
            self._hops_ms.clear()

    async def _on_metrics(self, msg: Msg) -> None:
        """This stage's series in the Prometheus text format (``parallax metrics``, ``/metrics?cluster=1``)."""
        if msg.reply:
            await self.nc.publish(msg.reply, self.metrics.exposition())

    async def _on_trace(self, msg: Msg) -> None:
        """This stage's spans of one request (``parallax trace``)."""
        if msg.reply:
            s = self.spec
            stage = {"node_id": self.config.node_id, "model": s.model, "start": s.start, "end": s.end}
            await self.nc.publish(msg.reply, self.tracer.answer(msg.data, stage, chunks.chunk_limit(self.nc.max_payload)))

    def stats(self) -> dict:
        e, s, hops = self.engine, self.engine.stats, sorted(self._hops_ms)
        blocks = e.blocks
        return {
            "node_id": self.config.node_id, "model": self.spec.model, "start": self.spec.start, "end": self.spec.end,
            "steps": s.steps, "rows": s.rows, "busy_s": s.busy_s, "prefix_hit_tokens": s.prefix_hit_tokens,
            "preempted": s.preempted, "requests": s.requests, "errors": dict(s.errors),
            "running": len(e.seqs), "waiting": len(e.waiting),
            "hop_ms": _summary(hops),
            "kv": {"block_size": blocks.block_size, "blocks_total": blocks.num_blocks, "blocks_used": blocks.used,
                   "blocks_cached": blocks.cached, "budget_bytes": blocks.num_blocks * self.backend.kv_block_bytes(blocks.block_size)},
            "rss_bytes": psutil.Process().memory_info().rss,
        }

    async def _engine_loop(self) -> None:
        """Steps run one after another in the stage's compute thread (``stages.compute``), never in the
        event loop's default pool: OpenMP keeps a team of worker threads per calling thread."""
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            while self.engine.has_work() and not self._stopping:
                started = time.perf_counter()
                try:
                    outgoing = await self.compute.step(self.engine.step)  # holding its cores, if shared
                except Exception:  # the engine already guards the backend; this is a last resort
                    log.exception("engine step failed")
                    continue
                await self._publish(outgoing)
                if self.config.debug_delay_ms:
                    await asyncio.sleep(self.config.debug_delay_ms / 1000)
                self._measure((time.perf_counter() - started) * 1000)  # the debug delay counts: a slow node

    def _measure(self, ms: float) -> None:
        self._step_ms = ms if self._step_ms is None else 0.9 * self._step_ms + 0.1 * ms

    async def _publish(self, outgoing: Outgoing) -> None:
        for subject, payload in outgoing:
            self.metrics.sent(len(payload))
            rids, headers = self.tracer.outgoing(payload)
            started = time.time()
            await chunks.publish(self.nc, subject, payload, headers)
            self.tracer.sent(rids, started, time.time())


async def _first_set(*events: asyncio.Event | None) -> None:
    """Wait until one of ``events`` is set."""
    waits = [asyncio.create_task(e.wait()) for e in events if e is not None]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()


async def _close(nc: NATS) -> None:
    try:
        await nc.drain()
    except Exception as e:  # the server may already be gone
        log.debug("drain failed: %s", e)


def _summary(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "p50": None, "p99": None, "mean": None}
    return {"count": len(values), "p50": values[len(values) // 2], "p99": values[min(len(values) - 1, int(len(values) * 0.99))],
            "mean": statistics.fmean(values)}
