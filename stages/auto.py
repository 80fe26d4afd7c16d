"""A stage started without ``--layers``: it registers as ``waiting`` with its memory, speed and the
model's sizes, watches its key ``assign.<node_id>`` in the registry, and serves whatever range the
leading scheduler writes there. A new range is loaded while the old one still serves; then the old
one hands its running requests back to their gateways (they resume on a complete chain). A drain
(SIGTERM) is the one of a ``--layers`` stage (:meth:`StageWorker.drain`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from parallax.broker.connection import connect
from parallax.broker.kv import DELETED, Presence, nodes_bucket
from parallax.broker.tasks import stop_task
from parallax.broker.registry import Assignment, NodeInfo, State, assign_key

from .backend import Backend
from .compute import ComputeThread
from .engine import EngineConfig
from .worker import NodeFacts, StageWorker, WorkerConfig, _close, _first_set, node_info

log = logging.getLogger(__name__)
LoadFn = Callable[[int, int], Backend]  # (start, end) -> a loaded backend (runs in a thread; a download
# in it tells AutoStage.downloaded how far it got, for the registry)


class AutoStage:
    def __init__(self, model: str, num_layers: int, device: str, dtype: str, load: LoadFn,
                 engine_config: Callable[[Backend], EngineConfig], config: WorkerConfig, facts: NodeFacts,
                 compute: ComputeThread | None = None):
        self.model, self.num_layers, self.device, self.dtype = model, num_layers, device, dtype
        self.load, self.engine_config, self.config, self.facts = load, engine_config, config, facts
        self.compute = compute or ComputeThread()  # loads, KV pools and steps of every range it serves
        self.worker: StageWorker | None = None
        self.state: State = "waiting"
        self.progress: float | None = None  # while loading: the fraction of the weights downloaded
        self._presence: Presence | None = None

    def describe(self) -> NodeInfo:
        if self.worker is not None:  # while a new range loads, the old one still serves
            return self.worker.describe()
        return node_info(self.config.node_id, self.model, self.num_layers, self.device, self.dtype, self.facts, self.state,
                         progress=self.progress if self.state == "loading" else None)

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None,
                  drain: asyncio.Event | None = None) -> None:
        """Serve what the scheduler assigns until ``stop`` is set (running requests are handed back at
        once) or ``drain`` is set: then no new assignment is followed and the range served drains as a
        ``--layers`` stage does (:meth:`StageWorker.drain`)."""
        nc = await connect(self.config.nats, name=f"parallax-stage-{self.config.node_id}")
        try:
            kv = await nodes_bucket(nc, self.config.nats.js_domain)
            async with Presence(kv, self.describe, self.config.heartbeat_s) as presence:
                self._presence = presence
                log.info("stage %s waiting for a layer assignment (key %s)", self.config.node_id, assign_key(self.config.node_id))
                follow, ended = asyncio.create_task(self._follow(kv, nc)), asyncio.create_task(_first_set(stop, drain))
                if ready is not None:
                    ready.set()
                done, _ = await asyncio.wait({follow, ended}, return_when=asyncio.FIRST_COMPLETED)
                broken = follow.exception() if follow in done and not follow.cancelled() else None
                await stop_task(follow)
                await stop_task(ended)
                if self.worker is not None:
                    await self.worker.leave(kv, stop, None if broken is not None else drain)
                if broken is not None:
                    raise broken  # the watch broke: exit rather than serve blind
        finally:
            await _close(nc)

    async def _follow(self, kv: KeyValue, nc: NATS) -> None:
        watcher = await kv.watch(assign_key(self.config.node_id))
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                assignment = None if entry.operation in DELETED else _parse(entry.value)
                await self._apply(assignment, nc)
        finally:
            await watcher.stop()

    async def _apply(self, a: Assignment | None, nc: NATS) -> None:
        current = None if self.worker is None else (self.worker.spec.start, self.worker.spec.end)
        wanted = None if a is None or a.model != self.model else (a.start, a.end)
        if wanted == current:
            return
        if wanted is None:
            await self._swap(None, "the scheduler took its layers away")
            return
        log.info("stage %s: loading layers %d:%d (plan %d)", self.config.node_id, *wanted, a.epoch)
        await self._set_state("loading")
        try:
            worker = await self.compute.run(self._build, *wanted)
        except Exception as e:  # a bad assignment must not kill the stage: it stays as it was
            log.error("stage %s could not load layers %d:%d: %s", self.config.node_id, *wanted, e)
            await self._set_state("waiting" if self.worker is None else "serving")
            return
        await worker.attach(nc)
        await self._swap(worker, f"moved to layers {wanted[0]}:{wanted[1]}")

    def _build(self, start: int, end: int) -> StageWorker:
        """Load ``start:end`` and build its engine (which fills the KV pool with zeros: a second or more
        for a large pool). In a worker thread: on the event loop it would stall the heartbeat past
        the key's TTL, and the scheduler would see this stage leave."""
        try:
            backend = self.load(start, end)
        finally:
            self.progress = None
        return StageWorker(backend, self.config, self.engine_config(backend), self.facts, self.compute)

    def downloaded(self, fraction: float) -> None:
        """From the loading thread, the fraction of the weights downloaded: the next heartbeat shows
        it (``loading 37%``)."""
        self.progress = fraction

    async def _swap(self, worker: StageWorker | None, reason: str) -> None:
        old, self.worker = self.worker, worker
        self.state = "serving" if worker is not None else "waiting"
        await self._beat()
        if old is not None:
            await old.detach(reason)

    async def _set_state(self, state: State) -> None:
        self.state = state
        if self.worker is None:
            await self._beat()

    async def _beat(self) -> None:
        if self._presence is not None:
            with contextlib.suppress(Exception):
                await self._presence.beat()


def _parse(value: bytes | None) -> Assignment | None:
    try:
        return Assignment.model_validate_json(value or b"")
    except ValueError as e:
        log.warning("ignored a bad assignment: %s", " ".join(str(e).split())[:200])
        return None
