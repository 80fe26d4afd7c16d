"""``parallax-scheduler``: places layers on stages started without ``--layers``.

Any number may run; one leads. The lead is the KV key ``leader`` (bucket ``parallax-nodes``): created
with a TTL by whoever finds it free, refreshed every heartbeat by compare-and-set, so a dead leader's
lock expires within ``lock_ttl_s`` and another scheduler takes over. The leader re-plans when the
membership changes (a stage joins, leaves, or a manual stage moves) and writes each changed range to
``assign.<node_id>`` with compare-and-set (:class:`~parallax.broker.kv.CasBucket`). Assignments have
no TTL: stages and gateways keep serving while no scheduler runs.

A stage whose key expires is planned around at once (a spare takes its layers), but its assignment
stays for ``forget_s``: a stage that only missed heartbeats (a stall while it loads, a starved CPU)
comes back to the range it was loading or serving. The assignment of a stage gone that long is
deleted. Only a stage that is there and planned idle loses its assignment at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field

import nats.errors
from nats.js import errors as js_errors
from nats.js.kv import KeyValue

from parallax import __version__
from parallax.broker.connection import NatsOptions, connect
from parallax.broker.errors import Unplaceable
from parallax.broker.kv import CasBucket, Presence, entries, nodes_bucket, watch_nodes
from parallax.broker.registry import (ASSIGN_PREFIX, HEARTBEAT_INTERVAL_S, KEY_TTL_S, LEADER_KEY, Assignment, NodeInfo,
                                      Registry, assign_key)
from parallax.broker.subjects import token
from parallax.broker.tasks import stop_task

from .planner import ModelCost, NodeCapacity, Plan, plan

log = logging.getLogger(__name__)
Current = dict[str, tuple[int, Assignment | None]]  # node_id -> (revision, assignment; None: unreadable) of assign.*


@dataclass(frozen=True)
class SchedulerConfig:
    nats: NatsOptions = NatsOptions()
    node_id: str = field(default_factory=lambda: f"sched-{socket.gethostname()}-{uuid.uuid4().hex[:6]}")
    heartbeat_s: float = HEARTBEAT_INTERVAL_S
    lock_ttl_s: int = KEY_TTL_S  # whole seconds (KV TTLs are)
    kv_reserve_tokens: int = 4096  # KV cache positions reserved per layer when fitting layers in memory
    hop_ms: float = 1.0
    tolerance: float = 0.10  # keep the current plan unless another is this much faster
    settle_s: float = 0.5  # wait for a burst of joins to end before planning
    forget_s: float = 30.0  # a stage missing this long is dead: its assignment is deleted (sooner: kept)

    def __post_init__(self) -> None:
        token(self.node_id)
        if self.heartbeat_s <= 0 or self.lock_ttl_s < 1 or self.heartbeat_s >= self.lock_ttl_s:
            raise ValueError("need 0 < heartbeat_s < lock_ttl_s (whole seconds, >= 1)")
        if self.kv_reserve_tokens < 0 or self.hop_ms < 0 or not 0 <= self.tolerance < 1 or self.settle_s < 0:
            raise ValueError("kv_reserve_tokens, hop_ms, settle_s must be >= 0 and tolerance in [0, 1)")
        if self.forget_s < 0:
            raise ValueError("forget_s must be >= 0")


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.registry = Registry()
        self.leading = False
        self.plans: dict[str, Plan] = {}  # the last plan per model (for tests and status)
        self._lock_rev = 0
        self._changed = asyncio.Event()
        self._planned: object = None  # membership the current assignments were planned for
        self._gone: dict[str, tuple[float, int]] = {}  # missing stage -> (monotonic since, its assignment's revision)

    def describe(self) -> NodeInfo:
        return NodeInfo(node_id=self.config.node_id, kind="scheduler", host=socket.gethostname(), version=__version__,
                        state="serving", updated=time.time())

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        nc = await connect(self.config.nats, name=f"parallax-scheduler-{self.config.node_id}")
        try:
            kv = await nodes_bucket(nc, self.config.nats.js_domain)
            bucket = CasBucket(kv)
            loaded = asyncio.Event()
            watch = asyncio.create_task(watch_nodes(kv, self.registry, self._changed.set, loaded))
            await asyncio.wait_for(loaded.wait(), 10)
            async with Presence(kv, self.describe, self.config.heartbeat_s):
                if ready is not None:
                    ready.set()
                await self._loop(bucket, stop)
            await stop_task(watch)
            await self._resign(bucket)
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()

    async def _loop(self, bucket: CasBucket, stop: asyncio.Event) -> None:
        while not stop.is_set():
            was_leading = self.leading
            self.leading = await self._hold_lock(bucket)
            if self.leading and not was_leading:
                log.info("scheduler %s leads", self.config.node_id)
                self._planned, self._gone = None, {}
            if self.leading:
                await self._lead(bucket)
            self._changed.clear()
            await _either(self._changed, stop, self.config.heartbeat_s)

    async def _lead(self, bucket: CasBucket) -> None:
        try:
            if self._membership() != self._planned:
                await asyncio.sleep(self.config.settle_s)
                await self._replan(bucket)
            await self._forget(bucket)
        except (nats.errors.Error, asyncio.TimeoutError) as e:  # a reconnect in progress: plan again next beat
            log.warning("planning failed: %s: %s", type(e).__name__, e)
            self._planned = None

    # --- the lock ------------------------------------------------------------------------------------
    async def _hold_lock(self, bucket: CasBucket) -> bool:
        """Refresh our lock, or take a free one; False when another scheduler holds it."""
        try:
            rev = await bucket.lock(LEADER_KEY, self.config.node_id.encode(), self._lock_rev if self.leading else 0,
                                    self.config.lock_ttl_s)
        except Exception as e:  # a reconnect in progress: assume we lost it, try again next beat
            log.warning("leader lock: %s: %s", type(e).__name__, e)
            return False
        if rev is None:
            return False
        self._lock_rev = rev
        return True

    async def _resign(self, bucket: CasBucket) -> None:
        if self.leading:
            with contextlib.suppress(Exception):
                await bucket.delete(LEADER_KEY, self._lock_rev)
            self.leading = False

    # --- planning ------------------------------------------------------------------------------------
    def _membership(self) -> object:
        """What a plan depends on; loads and speeds drift, so they alone do not trigger a re-plan."""
        return frozenset((n.node_id, n.model, n.memory_offered, n.manual and n.layers, n.profile is not None)
                         for n in self.registry.nodes(kind="stage"))

    async def _replan(self, bucket: CasBucket) -> None:
        membership = self._membership()
        present = self.registry.nodes(kind="stage")
        stages = [n for n in present if n.profile is not None and n.model]
        current = await self._assignments(bucket.kv)
        self._note_gone(current, {n.node_id for n in present})
        written = True
        for model in sorted({n.model for n in stages}):
            nodes = [n for n in stages if n.model == model]
            try:
                written &= await self._apply(bucket, model, nodes, self._plan(model, nodes, current), current)
            except Unplaceable as e:
                log.warning("model %s: %s; keeping the current assignments", model, e)
        if written:  # else someone wrote in between: plan again next round
            self._planned = membership

    def _plan(self, model: str, nodes: list[NodeInfo], current: Current) -> Plan:
        profile = max((n.profile for n in nodes), key=lambda p: p.num_layers)
        cost = ModelCost(num_layers=profile.num_layers, layer_bytes=profile.layer_bytes,
                         kv_reserve_bytes=profile.kv_bytes_per_token * self.config.kv_reserve_tokens,
                         first_bytes=profile.first_bytes, last_bytes=profile.last_bytes, hop_ms=self.config.hop_ms,
                         layer_bytes_list=profile.layer_bytes_list,
                         kv_reserve_list=profile.kv_reserve(self.config.kv_reserve_tokens) if profile.kv_windows else None)
        known = [n.layer_ms for n in nodes if n.layer_ms]
        default_ms = sorted(known)[len(known) // 2] if known else 1.0
        caps = [NodeCapacity(n.node_id, n.memory_offered, n.layer_ms or default_ms, n.layers if n.manual else None)
                for n in sorted(nodes, key=lambda n: n.node_id)]
        previous = {node: (a.start, a.end) for node, (_, a) in current.items() if a is not None and a.model == model}
        previous.update({n.node_id: n.layers for n in nodes if n.manual and n.layers})
        result = plan(cost, caps, previous, self.config.tolerance)
        self.plans[model] = result
        log.info("model %s: %s (%.1f tok/s estimated)", model, _describe(result), result.throughput)
        return result

    async def _apply(self, bucket: CasBucket, model: str, nodes: list[NodeInfo], result: Plan, current: Current) -> bool:
        """Write the changed assignments of ``model``'s ``nodes`` (the stages there now; a missing
        stage's assignment is left to :meth:`_forget`); False if a compare-and-set lost a race."""
        manual = {n.node_id for n in nodes if n.manual}
        epoch = 1 + max((a.epoch for _, a in current.values() if a is not None), default=0)
        wanted = {node: rng for node, rng in result.assignments().items() if node not in manual}
        ok = True
        for node, (start, end) in wanted.items():
            rev, old = current.get(node, (0, None))
            if old is not None and (old.model, old.start, old.end) == (model, start, end):
                continue
            value = Assignment(node_id=node, model=model, start=start, end=end, epoch=epoch, scheduler=self.config.node_id)
            ok &= await _write(bucket, assign_key(node), value.model_dump_json().encode(), rev)
        for node in {n.node_id for n in nodes} - wanted.keys():  # idle or placed by hand: no assignment
            if node in current:
                await bucket.delete(assign_key(node), current[node][0])
        return ok

    def _note_gone(self, current: Current, present: set[str]) -> None:
        """Since when each stage that has an assignment has been missing from the registry."""
        now = time.monotonic()
        self._gone = {node: (self._gone.get(node, (now, 0))[0], rev)
                      for node, (rev, _) in current.items() if node not in present}

    async def _forget(self, bucket: CasBucket) -> None:
        """Delete the assignment of a stage missing for ``forget_s`` (one back sooner keeps it)."""
        present = {n.node_id for n in self.registry.nodes(kind="stage")}
        now = time.monotonic()
        for node, (since, rev) in list(self._gone.items()):
            if node in present:
                del self._gone[node]
            elif now - since >= self.config.forget_s:
                del self._gone[node]
                if await bucket.delete(assign_key(node), rev):
                    log.info("stage %s missing for %.0f s: deleted its assignment", node, now - since)

    @staticmethod
    async def _assignments(kv: KeyValue) -> Current:
        """Every ``assign.<node_id>`` key with a value: its revision and assignment."""
        found = await entries(kv, f"{ASSIGN_PREFIX}>")
        return {key[len(ASSIGN_PREFIX):]: (e.revision, _parse(e.value)) for key, e in found.items()}


def _parse(value: bytes) -> Assignment | None:
    try:
        return Assignment.model_validate_json(value)
    except ValueError as e:
        log.warning("an unreadable assignment will be overwritten: %s", " ".join(str(e).split())[:200])
        return None


async def _write(bucket: CasBucket, key: str, value: bytes, rev: int) -> bool:
    try:
        await bucket.write(key, value, rev)
        return True
    except js_errors.KeyWrongLastSequenceError:
        log.warning("%s changed under us; planning again", key)
        return False


async def _either(event: asyncio.Event, stop: asyncio.Event, timeout_s: float) -> None:
    """Return when ``event`` or ``stop`` is set, or after ``timeout_s``."""
    tasks = [asyncio.create_task(event.wait()), asyncio.create_task(stop.wait())]
    await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        await stop_task(t)


def _describe(result: Plan) -> str:
    pipes = [" -> ".join(f"{p.node_id}[{p.start}:{p.end}]" for p in pipe) for pipe in result.pipelines]
    idle = f"; idle: {', '.join(result.idle)}" if result.idle else ""
    return " | ".join(pipes) + idle
