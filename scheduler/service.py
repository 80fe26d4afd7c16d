"""``parallax-scheduler``: places layers on stages started without ``--layers``.

Any number may run; one leads. The lead is the KV key ``leader`` (bucket ``parallax-nodes``): created
with a TTL by whoever finds it free, refreshed every heartbeat by compare-and-set, so a dead leader's
lock expires within ``lock_ttl_s`` and another scheduler takes over. The leader re-plans when the
membership changes (a stage joins, leaves, or a manual stage moves) and writes each changed range to
``assign.<node_id>`` with compare-and-set. Assignments have no TTL: stages and gateways keep serving
while no scheduler runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field

from nats.js import errors as js_errors
from nats.js.kv import KeyValue

from parallax import __version__
from parallax.broker.connection import connect
from parallax.broker.errors import Unplaceable
from parallax.broker.kv import DELETED, Presence, cas_ttl, nodes_bucket, watch_nodes
from parallax.broker.registry import HEARTBEAT_INTERVAL_S, LEADER_KEY, Assignment, NodeInfo, Registry, assign_key
from parallax.broker.subjects import token
from parallax.broker.tasks import stop_task

from .planner import ModelCost, NodeCapacity, Plan, plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    nats_url: str = "nats://127.0.0.1:4222"
    node_id: str = field(default_factory=lambda: f"sched-{socket.gethostname()}-{uuid.uuid4().hex[:6]}")
    heartbeat_s: float = HEARTBEAT_INTERVAL_S
    lock_ttl_s: int = 3  # whole seconds (KV TTLs are)
    kv_reserve_tokens: int = 4096  # KV cache positions reserved per layer when fitting layers in memory
    hop_ms: float = 1.0
    tolerance: float = 0.10  # keep the current plan unless another is this much faster
    settle_s: float = 0.5  # wait for a burst of joins to end before planning

    def __post_init__(self) -> None:
        token(self.node_id)
        if self.heartbeat_s <= 0 or self.lock_ttl_s < 1 or self.heartbeat_s >= self.lock_ttl_s:
            raise ValueError("need 0 < heartbeat_s < lock_ttl_s (whole seconds, >= 1)")
        if self.kv_reserve_tokens < 0 or self.hop_ms < 0 or not 0 <= self.tolerance < 1 or self.settle_s < 0:
            raise ValueError("kv_reserve_tokens, hop_ms, settle_s must be >= 0 and tolerance in [0, 1)")


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.registry = Registry()
        self.leading = False
        self.plans: dict[str, Plan] = {}  # the last plan per model (for tests and status)
        self._lock_rev = 0
        self._changed = asyncio.Event()
        self._planned: object = None  # membership the current assignments were planned for

    def describe(self) -> NodeInfo:
        return NodeInfo(node_id=self.config.node_id, kind="scheduler", host=socket.gethostname(), version=__version__,
                        state="serving", updated=time.time())

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        nc = await connect(self.config.nats_url, name=f"parallax-scheduler-{self.config.node_id}")
        try:
            kv = await nodes_bucket(nc)
            loaded = asyncio.Event()
            watch = asyncio.create_task(watch_nodes(kv, self.registry, self._changed.set, loaded))
            await asyncio.wait_for(loaded.wait(), 10)
            async with Presence(kv, self.describe, self.config.heartbeat_s):
                if ready is not None:
                    ready.set()
                await self._loop(kv, stop)
            await stop_task(watch)
            await self._resign(kv)
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()

    async def _loop(self, kv: KeyValue, stop: asyncio.Event) -> None:
        while not stop.is_set():
            was_leading = self.leading
            self.leading = await self._hold_lock(kv)
            if self.leading and not was_leading:
                log.info("scheduler %s leads", self.config.node_id)
                self._planned = None
            if self.leading and self._membership() != self._planned:
                await asyncio.sleep(self.config.settle_s)
                await self._replan(kv)
            self._changed.clear()
            await _either(self._changed, stop, self.config.heartbeat_s)

    # --- the lock ------------------------------------------------------------------------------------
    async def _hold_lock(self, kv: KeyValue) -> bool:
        """Refresh our lock, or take a free one; False when another scheduler holds it."""
        me = self.config.node_id.encode()
        try:
            self._lock_rev = await cas_ttl(kv, LEADER_KEY, me, self._lock_rev if self.leading else await _free_rev(kv),
                                           self.config.lock_ttl_s)
            return True
        except js_errors.KeyWrongLastSequenceError:
            return False
        except Exception as e:  # a reconnect in progress: assume we lost it, try again next beat
            log.warning("leader lock: %s: %s", type(e).__name__, e)
            return False

    async def _resign(self, kv: KeyValue) -> None:
        if self.leading:
            with contextlib.suppress(Exception):
                await kv.delete(LEADER_KEY, last=self._lock_rev)
            self.leading = False

    # --- planning ------------------------------------------------------------------------------------
    def _membership(self) -> object:
        """What a plan depends on; loads and speeds drift, so they alone do not trigger a re-plan."""
        return frozenset((n.node_id, n.model, n.memory_offered, n.manual and n.layers, n.profile is not None)
                         for n in self.registry.nodes(kind="stage"))

    async def _replan(self, kv: KeyValue) -> None:
        membership = self._membership()
        stages = [n for n in self.registry.nodes(kind="stage") if n.profile is not None and n.model]
        current = await self._assignments(kv)
        written = True
        for model in sorted({n.model for n in stages}):
            nodes = [n for n in stages if n.model == model]
            try:
                written &= await self._apply(kv, model, self._plan(model, nodes, current), current)
            except Unplaceable as e:
                log.warning("model %s: %s; keeping the current assignments", model, e)
        await self._drop_stale(kv, current, {n.node_id for n in stages})
        if written:  # else someone wrote in between: plan again next round
            self._planned = membership

    def _plan(self, model: str, nodes: list[NodeInfo], current: dict[str, tuple[int, Assignment]]) -> Plan:
        profile = max((n.profile for n in nodes), key=lambda p: p.num_layers)
        cost = ModelCost(num_layers=profile.num_layers, layer_bytes=profile.layer_bytes,
                         kv_reserve_bytes=profile.kv_bytes_per_token * self.config.kv_reserve_tokens,
                         first_bytes=profile.first_bytes, last_bytes=profile.last_bytes, hop_ms=self.config.hop_ms)
        known = [n.layer_ms for n in nodes if n.layer_ms]
        default_ms = sorted(known)[len(known) // 2] if known else 1.0
        caps = [NodeCapacity(n.node_id, n.memory_offered, n.layer_ms or default_ms, n.layers if n.manual else None)
                for n in sorted(nodes, key=lambda n: n.node_id)]
        previous = {node: (a.start, a.end) for node, (_, a) in current.items() if a.model == model}
        previous.update({n.node_id: n.layers for n in nodes if n.manual and n.layers})
        result = plan(cost, caps, previous, self.config.tolerance)
        self.plans[model] = result
        log.info("model %s: %s (%.1f tok/s estimated)", model, _describe(result), result.throughput)
        return result

    async def _apply(self, kv: KeyValue, model: str, result: Plan, current: dict[str, tuple[int, Assignment]]) -> bool:
        """Write the changed assignments of ``model``; False if a compare-and-set lost a race."""
        manual = {n.node_id for n in self.registry.nodes(model) if n.manual}
        epoch = 1 + max((a.epoch for _, a in current.values()), default=0)
        wanted = {node: rng for node, rng in result.assignments().items() if node not in manual}
        ok = True
        for node, (start, end) in wanted.items():
            rev, old = current.get(node, (0, None))
            if old is not None and (old.model, old.start, old.end) == (model, start, end):
                continue
            value = Assignment(node_id=node, model=model, start=start, end=end, epoch=epoch, scheduler=self.config.node_id)
            ok &= await _cas(kv, assign_key(node), value.model_dump_json().encode(), rev)
        for node, (rev, old) in current.items():
            if old.model == model and node not in wanted:
                await _delete(kv, assign_key(node), rev)
        return ok

    async def _drop_stale(self, kv: KeyValue, current: dict[str, tuple[int, Assignment]], alive: set[str]) -> None:
        for node, (rev, _) in current.items():
            if node not in alive:
                await _delete(kv, assign_key(node), rev)

    @staticmethod
    async def _assignments(kv: KeyValue) -> dict[str, tuple[int, Assignment]]:
        """node_id -> (revision, assignment) of every ``assign.*`` key."""
        out: dict[str, tuple[int, Assignment]] = {}
        try:
            keys = [k for k in await kv.keys() if k.startswith("assign.")]  # (key filters miss here)
        except js_errors.NoKeysError:
            return out
        for key in keys:
            with contextlib.suppress(js_errors.KeyNotFoundError, js_errors.KeyDeletedError, ValueError):
                entry = await kv.get(key)
                assignment = Assignment.model_validate_json(entry.value or b"")
                out[assignment.node_id] = (entry.revision, assignment)
        return out


async def _free_rev(kv: KeyValue) -> int:
    """The revision to compare against when taking the lock: 0 if the key never existed, the
    marker's revision if it expired or was deleted; raises if someone holds it."""
    try:
        entry = await kv.get(LEADER_KEY)
    except js_errors.KeyNotFoundError:
        return 0
    except js_errors.KeyDeletedError as e:
        return e.entry.revision if e.entry is not None else 0
    if entry.operation in DELETED or not entry.value:
        return entry.revision
    raise js_errors.KeyWrongLastSequenceError(description=f"held by {entry.value.decode(errors='replace')}")


async def _cas(kv: KeyValue, key: str, value: bytes, rev: int) -> bool:
    try:
        await kv.update(key, value, last=rev)
        return True
    except js_errors.KeyWrongLastSequenceError:
        log.warning("%s changed under us; planning again", key)
        return False


async def _delete(kv: KeyValue, key: str, rev: int) -> None:
    with contextlib.suppress(js_errors.KeyWrongLastSequenceError, js_errors.KeyNotFoundError):
        await kv.delete(key, last=rev)


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
