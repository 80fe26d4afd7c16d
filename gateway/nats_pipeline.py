"""The gateway's client of the stage chain over NATS.

Each request gets a route of concrete replicas, one per hop (:func:`choose_route`: by expected time
from the registry's load and measured speed and this gateway's own in-flight counts, or
round-robin), pinned in its :class:`RequestMeta` and sent to the first node's own
subject, so every hop goes to the chosen replica; tokens and errors come back on this gateway's
subject. The gateway watches the registry (JetStream KV, keys expire ``KEY_TTL_S`` after a node's
last heartbeat), so a stage that dies while serving a request turns
into a :class:`StageFailed` within a few seconds instead of a hang. A request a stage hands back
(``preempted``: KV full, or the stage moved to other layers) is resubmitted with its tokens so far,
once a chain is complete again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Literal

import numpy as np
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from parallax import __version__
from parallax.broker import chunks, subjects
from parallax.broker.errors import ChainUnavailable, Retry, StageFailed, WireError
from parallax.broker.wire import RETRYABLE, ErrorMsg, Forward, ForwardItem, Release, RequestMeta, SamplingParams, TokenOut, Tokens, encode
from parallax.broker.kv import Presence, nodes_bucket, watch_nodes
from parallax.broker.tasks import stop_task
from parallax.broker.registry import HEARTBEAT_INTERVAL_S, Load, NodeInfo, Registry
from parallax.scheduler.routing import POLICIES, RouteState, choose_route, find_chain, missing_ranges

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    model: str
    num_layers: int
    gateway_id: str = ""
    first_token_timeout_s: float = 600.0  # a long prompt on a slow CPU may take minutes
    token_timeout_s: float = 120.0
    check_every_s: float = 0.25
    max_retries: int = 8  # resubmissions of a preempted request
    chain_wait_s: float = 30.0  # how long a resubmission waits for a complete chain (a stage reloading)
    heartbeat_s: float = HEARTBEAT_INTERVAL_S
    routing: Literal["load", "round-robin"] = "load"  # how a request's replicas are chosen (scheduler.routing)

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.first_token_timeout_s <= 0 or self.token_timeout_s <= 0:
            raise ValueError("num_layers and timeouts must be positive")
        if self.routing not in POLICIES:
            raise ValueError(f"routing must be one of {', '.join(POLICIES)}, got {self.routing!r}")


class NatsPipeline:
    def __init__(self, nc: NATS, config: PipelineConfig):
        self.nc, self.config = nc, config
        self.gateway_id = config.gateway_id or uuid.uuid4().hex[:12]
        self.subject = subjects.gateway(self.gateway_id)
        self.registry = Registry()
        self._streams: dict[str, asyncio.Queue] = {}
        self._reassembler = chunks.Reassembler()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._presence: Presence | None = None
        self.routes = RouteState()  # local in-flight counts per node, the round-robin turn

    async def start(self) -> None:
        """Subscribe to replies, load the registry (returns once the current nodes are known) and
        register this gateway."""
        await self.nc.subscribe(self.subject, cb=self._on_reply)
        kv = await nodes_bucket(self.nc)
        ready = asyncio.Event()
        self._tasks.append(asyncio.create_task(watch_nodes(kv, self.registry, self._changed.set, ready)))
        await asyncio.wait_for(ready.wait(), 10)
        self._presence = Presence(kv, self.describe, self.config.heartbeat_s)
        await self._presence.__aenter__()

    async def close(self) -> None:
        """Deregister and stop watching (the connection stays the caller's)."""
        if self._presence is not None:
            await self._presence.__aexit__(None, None, None)
            self._presence = None
        for task in self._tasks:
            await stop_task(task)
        self._tasks.clear()

    def describe(self) -> NodeInfo:
        return NodeInfo(node_id=self.gateway_id, kind="gateway", model=self.config.model, num_layers=self.config.num_layers,
                        host=socket.gethostname(), version=__version__, updated=time.time(),
                        load=Load(running=len(self._streams)))

    # --- Pipeline protocol -------------------------------------------------------------------------
    def missing(self) -> list[tuple[int, int]]:
        return missing_ranges(self._ranges(), self.config.num_layers)

    async def generate(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenOut]:
        """Stream tokens; a request a stage preempted (KV full) or could not serve from its prefix
        cache is resubmitted with the tokens so far, up to ``max_retries`` times, with what is left of
        its max_tokens and min_tokens (:meth:`SamplingParams.rest`). The last token carries the last
        stage's ``finish``."""
        generated: list[int] = []
        prefix_cache = True
        for attempt in range(self.config.max_retries + 1):
            sub_rid = rid if attempt == 0 else f"{rid}~{attempt}"
            try:
                async for event in self._attempt(sub_rid, prompt_ids + generated, params.rest(len(generated)), prefix_cache):
                    yield event.model_copy(update={"rid": rid, "index": len(generated)})
                    generated.append(event.token)
                return
            except Retry as r:
                log.info("request %s: %s; resubmitting with %d tokens so far", rid, r, len(generated))
                prefix_cache = prefix_cache and r.code != "prefix_miss"
                await self._wait_for_chain(self.config.chain_wait_s)
        raise StageFailed(f"request {rid} was preempted {self.config.max_retries + 1} times; the cluster is out of KV memory")

    async def _attempt(self, rid: str, prompt_ids: list[int], params: SamplingParams, prefix_cache: bool) -> AsyncIterator[TokenOut]:
        hops = choose_route(self.registry.serving(self.config.model), self.config.num_layers, self.config.routing, self.routes)
        if hops is None:
            raise ChainUnavailable(self.config.model, self.missing())
        chain = [(a, b) for _, a, b in hops]
        route = tuple(node_id for node_id, _, _ in hops)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = queue
        self.routes.acquire(hops)
        finished, first = False, True
        try:
            await self._send(rid, prompt_ids, params, chain, prefix_cache, route)
            while not finished:
                event = await self._next(queue, chain, route, first)
                first, finished = False, event.finish is not None
                yield event
        finally:
            self.routes.release(hops)
            self._streams.pop(rid, None)
            if not finished and not self.nc.is_closed:
                await self.nc.publish(subjects.release(self.config.model), encode(Release(rids=(rid,))))

    # --- internals ---------------------------------------------------------------------------------
    async def _wait_for_chain(self, limit_s: float) -> None:
        """Return once a complete chain is registered, or after ``limit_s`` (the caller then fails
        with the missing ranges)."""
        deadline = time.monotonic() + limit_s
        while find_chain(self._ranges(), self.config.num_layers) is None and time.monotonic() < deadline:
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(1.0, max(0.0, deadline - time.monotonic())))

    def _ranges(self) -> list[tuple[int, int]]:
        return [n.layers for n in self.registry.serving(self.config.model)]

    async def _send(self, rid: str, prompt_ids: list[int], params: SamplingParams, chain: list[tuple[int, int]],
                    prefix_cache: bool, route: tuple[str, ...]) -> None:
        """Publish the prompt to the first node of ``route``, the whole route pinned in the meta."""
        meta = RequestMeta(reply=self.subject, chain=tuple(chain), route=route, sampling=params,
                           prompt_ids=tuple(prompt_ids), prefix_cache=prefix_cache)
        item = ForwardItem(rid=rid, pos=0, n=len(prompt_ids), meta=meta)
        ids = np.asarray(prompt_ids, dtype="<i4").tobytes()
        payload = encode(Forward(items=(item,), dtype="int32", shape=(len(prompt_ids),)), ids)
        await chunks.publish(self.nc, subjects.node(self.config.model, *chain[0], route[0]), payload)

    async def _next(self, queue: asyncio.Queue, chain: list[tuple[int, int]], route: tuple[str, ...], first: bool) -> TokenOut:
        limit = self.config.first_token_timeout_s if first else self.config.token_timeout_s
        deadline = time.monotonic() + limit
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), self.config.check_every_s)
            except asyncio.TimeoutError:
                self._check_alive(chain, route)
                if time.monotonic() > deadline:
                    raise StageFailed(f"no token from the pipeline within {limit:.0f} s") from None
                continue
            if isinstance(event, ErrorMsg):
                raise (Retry(event.message, event.code) if event.code in RETRYABLE else StageFailed(event.message))
            return event

    def _check_alive(self, chain: list[tuple[int, int]], route: tuple[str, ...]) -> None:
        """Fail the request when a replica it is pinned to left the registry or its range."""
        nodes = {n.node_id: n for n in self.registry.serving(self.config.model)}
        for node_id, (a, b) in zip(route, chain):
            if node_id not in nodes:
                raise StageFailed(f"stage {node_id} serving layers {a}:{b} stopped while serving the request")
            if nodes[node_id].layers != (a, b):
                raise StageFailed(f"stage {node_id} stopped serving layers {a}:{b} while serving the request")

    async def _on_reply(self, msg: Msg) -> None:
        try:
            received = self._reassembler.receive(msg.data, msg.headers)
        except WireError as e:
            log.warning("dropped malformed reply: %s", e)
            return
        header = received[0] if received else None
        if isinstance(header, Tokens):
            for item in header.items:
                self._deliver(item.rid, item)
        elif isinstance(header, ErrorMsg):
            self._deliver(header.rid, header)

    def _deliver(self, rid: str | None, event) -> None:
        queue = self._streams.get(rid) if rid else None
        if queue is not None:
            queue.put_nowait(event)
