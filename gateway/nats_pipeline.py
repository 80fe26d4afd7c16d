"""The gateway's client of the stage chain over NATS.

Each request gets a route of concrete replicas, one per hop (:func:`choose_route`: by expected
time from the registry's load and measured speed and this gateway's own in-flight counts, or
round-robin), pinned in its :class:`RequestMeta` and sent to the first node's own
subject, so every hop goes to the chosen replica; tokens and errors come back on this gateway's
subject. A request is resumed, with its tokens so far, on a complete chain of live replicas when
its route breaks: a stage hands it back (``preempted``: KV full, or the stage moved to other
layers), a stage on its route dies or leaves its range (the gateway watches the registry, JetStream
KV, whose keys expire ``KEY_TTL_S`` after a node's last heartbeat), no token comes for
``stall_timeout_s``, a token of the route is missing, or this gateway's NATS connection was lost and
is back (what was in flight through the lost server is gone: every running request resumes at once,
and after a reconnect a try is sent once each stage of its route answers on its own subject again:
a stage that lost the same server may still be reconnecting, and a prompt sent then would be lost).
Every try runs under its own id (``rid``, ``rid~1``, ...): late tokens of an abandoned try find no
stream and are dropped, and the stages drop work for an id they released.
A resumed request waits up to ``chain_wait_s`` for a replica of a lost range, then fails with
:class:`StageFailed`. :meth:`NatsPipeline.cancel` ends a running request at once (abort, deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Literal

import numpy as np
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from parallax import __version__
from parallax.broker import chunks, subjects
from parallax.broker.errors import ChainUnavailable, HopLost, ParallaxError, Retry, StageFailed, WireError
from parallax.broker.wire import RETRYABLE, ErrorMsg, Forward, ForwardItem, Release, RequestMeta, SamplingParams, TokenOut, Tokens, encode
from parallax.broker.connection import on_reconnect
from parallax.broker.kv import Presence, nodes_bucket, watch_nodes
from parallax.broker.observe import TraceContext, current_trace, trace_header
from parallax.broker.tasks import stop_task
from parallax.broker.registry import DEAD_NODE_NOTICED_S, HEARTBEAT_INTERVAL_S, Load, NodeInfo, Registry
from parallax.scheduler.routing import POLICIES, RouteState, choose_route, find_chain, missing_ranges

log = logging.getLogger(__name__)
# No token for this long after a request's first one: its route is treated as lost and the request
# resumes elsewhere (a backstop for what the registry cannot see: a stage restarted under the same
# id, a lost message). Well above the time a dead node takes to leave the registry.
STALL_TIMEOUT_S = 4 * DEAD_NODE_NOTICED_S
_CANCELLED = object()  # put into a request's queue by cancel(): wakes its reader at once
_RECONNECTED = object()  # put into every running try's queue when the connection is back: the try resumes


@dataclass(frozen=True)
class PipelineConfig:
    model: str
    num_layers: int
    gateway_id: str = ""
    first_token_timeout_s: float = 600.0  # a long prompt on a slow CPU may take minutes
    stall_timeout_s: float = STALL_TIMEOUT_S  # between two tokens; then the request resumes on another route
    check_every_s: float = 0.25
    max_retries: int = 8  # resubmissions of a request (preempted, or its route broke)
    chain_wait_s: float = 30.0  # how long a resubmission waits for a complete chain (a stage reloading or dead)
    heartbeat_s: float = HEARTBEAT_INTERVAL_S
    routing: Literal["load", "round-robin"] = "load"  # how a request's replicas are chosen (scheduler.routing)
    js_domain: str | None = None  # the JetStream domain of the registry bucket (None: the server's own)

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.first_token_timeout_s <= 0 or self.stall_timeout_s <= 0 or self.check_every_s <= 0:
            raise ValueError("num_layers and timeouts must be positive")
        if self.max_retries < 0 or self.chain_wait_s < 0:
            raise ValueError("max_retries and chain_wait_s must not be negative")
        if self.routing not in POLICIES:
            raise ValueError(f"routing must be one of {', '.join(POLICIES)}, got {self.routing!r}")


@dataclass
class _Request:
    """What cancel() needs of a running request: the id of its current try, and why it was ended."""

    attempt: str | None = None
    error: ParallaxError | None = None
    trace: TraceContext | None = None  # every try's messages name it (stages record their spans under it)

    def check(self) -> None:
        if self.error is not None:
            raise self.error


class NatsPipeline:
    def __init__(self, nc: NATS, config: PipelineConfig):
        self.nc, self.config = nc, config
        self.gateway_id = config.gateway_id or uuid.uuid4().hex[:12]
        self.subject = subjects.gateway(self.gateway_id)
        self.registry = Registry()
        self._streams: dict[str, asyncio.Queue] = {}  # by the id of a request's current try
        self._requests: dict[str, _Request] = {}  # by the client's request id
        self._background: set[asyncio.Task] = set()
        self._reassembler = chunks.Reassembler()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._presence: Presence | None = None
        self._unhook: Callable[[], None] | None = None  # stops the reconnect callback
        self._reconnects = 0  # how many times the connection came back
        self._reachable: dict[str, int] = {}  # node id -> self._reconnects when it last answered its subject
        self.routes = RouteState()  # local in-flight counts per node, the round-robin turn

    async def start(self) -> None:
        """Subscribe to replies, load the registry (returns once the current nodes are known) and
        register this gateway."""
        await self.nc.subscribe(self.subject, cb=self._on_reply)
        self._unhook = on_reconnect(self.nc, self._reconnected)
        kv = await nodes_bucket(self.nc, self.config.js_domain)
        ready = asyncio.Event()
        self._tasks.append(asyncio.create_task(watch_nodes(kv, self.registry, self._changed.set, ready)))
        await asyncio.wait_for(ready.wait(), 10)
        self._presence = Presence(kv, self.describe, self.config.heartbeat_s)
        await self._presence.__aenter__()

    async def close(self) -> None:
        """Deregister and stop watching (the connection stays the caller's)."""
        if self._unhook is not None:
            self._unhook()
            self._unhook = None
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
        """Stream tokens. A request whose route breaks (a stage preempted it or could not serve it
        from its prefix cache, a stage on its route died or went silent) is resubmitted with the
        tokens so far, up to ``max_retries`` times, with what is left of its max_tokens and
        min_tokens and the number of its next token (:meth:`SamplingParams.rest`: a seeded request
        draws what an undisturbed run draws): the caller sees one unbroken stream. The last token
        carries the last stage's ``finish``."""
        request = _Request(trace=current_trace.get() or TraceContext.new())  # W3C traceparent of the HTTP request
        self._requests[rid] = request
        generated: list[int] = []
        prefix_cache = True
        try:
            for attempt in range(self.config.max_retries + 1):
                request.attempt = rid if attempt == 0 else f"{rid}~{attempt}"
                try:
                    async for event in self._attempt(request, prompt_ids + generated, params.rest(len(generated)), prefix_cache):
                        yield event.model_copy(update={"rid": rid, "index": len(generated)})
                        generated.append(event.token)
                    return
                except Retry as r:
                    log.info("request %s: %s; resubmitting with %d tokens so far", rid, r, len(generated))
                    prefix_cache = prefix_cache and r.code != "prefix_miss"
                    await self._wait_for_chain(self.config.chain_wait_s, request)
                except HopLost as lost:
                    log.warning("request %s: %s; resuming on live replicas with %d tokens so far", rid, lost, len(generated))
                    await self._wait_for_chain(self.config.chain_wait_s, request)
                    if missing := self.missing():
                        ranges = ", ".join(f"{a}:{b}" for a, b in missing)
                        raise StageFailed(f"{lost}, and no stage served layers {ranges} again within "
                                          f"{self.config.chain_wait_s:g} s") from None
            raise StageFailed(f"request {rid} was interrupted {self.config.max_retries + 1} times (preempted or its stages "
                              "died); the cluster is out of KV memory or unstable")
        finally:
            self._requests.pop(rid, None)

    def cancel(self, rid: str, error: ParallaxError) -> bool:
        """End the running request ``rid``: every stage releases it now and its stream raises
        ``error`` at once. False when no request ``rid`` is running here."""
        request = self._requests.get(rid)
        if request is None:
            return False
        if request.error is None:
            request.error = error
            if request.attempt is not None:
                if (queue := self._streams.get(request.attempt)) is not None:
                    queue.put_nowait(_CANCELLED)
                self._spawn(self._release(request.attempt))
        return True

    async def _attempt(self, request: _Request, prompt_ids: list[int], params: SamplingParams,
                       prefix_cache: bool) -> AsyncIterator[TokenOut]:
        request.check()
        rid = request.attempt
        hops = choose_route(self.registry.serving(self.config.model), self.config.num_layers, self.config.routing, self.routes)
        if hops is None:
            raise ChainUnavailable(self.config.model, self.missing())
        chain = [(a, b) for _, a, b in hops]
        route = tuple(node_id for node_id, _, _ in hops)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = queue
        self.routes.acquire(hops)
        finished, count = False, 0
        try:
            await self._until_reachable(route, request)
            await self._send(rid, prompt_ids, params, chain, prefix_cache, route, request.trace)
            while not finished:
                event = await self._next(queue, chain, route, count == 0, request)
                if event.index != count:  # lost with a NATS server (the tokens of one try arrive in order)
                    raise HopLost(f"token {count} from route {' -> '.join(route)} was lost (token {event.index} came)")
                count, finished = count + 1, event.finish is not None
                yield event
        finally:
            self.routes.release(hops)
            self._streams.pop(rid, None)
            if not finished:
                await self._release(rid)

    # --- internals ---------------------------------------------------------------------------------
    async def _wait_for_chain(self, limit_s: float, request: _Request) -> None:
        """Return once a complete chain is registered, or after ``limit_s`` (the caller then fails
        with the missing ranges); raises the request's error when it is cancelled meanwhile."""
        deadline = time.monotonic() + limit_s
        while find_chain(self._ranges(), self.config.num_layers) is None and time.monotonic() < deadline:
            request.check()
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(self.config.check_every_s, max(0.0, deadline - time.monotonic())))
        request.check()

    async def _release(self, rid: str) -> None:
        """Tell every stage to drop ``rid`` (a broadcast: each frees its KV at its next step)."""
        if not self.nc.is_closed:
            await self.nc.publish(subjects.release(self.config.model), encode(Release(rids=(rid,))))

    def _reconnected(self) -> None:
        """The connection is back after a loss (perhaps on another server of the cluster): prompts,
        activations and tokens that were in flight through the lost server are gone, and no stage would
        say so. Every running try resumes now, with its tokens so far, as when its route breaks."""
        self._reconnects += 1
        if self._streams:
            log.warning("NATS connection back: resuming %d running requests", len(self._streams))
        for queue in self._streams.values():
            queue.put_nowait(_RECONNECTED)

    async def _until_reachable(self, route: tuple[str, ...], request: _Request) -> None:
        """After a reconnect, until every node of ``route`` has interest on its own subject (``parallax.stage.<id>``,
        subscribed after its layer subject; NATS answers "no responders" at once while no server of the cluster
        knows one), once per node and reconnect, at most ``chain_wait_s``: then the try goes anyway and the
        usual timeouts stand."""
        deadline = time.monotonic() + self.config.chain_wait_s
        for node_id in route:
            while self._reachable.get(node_id, 0) != self._reconnects:
                request.check()
                try:
                    await self.nc.request(subjects.stage(node_id), b"", timeout=self.config.check_every_s)
                except NoRespondersError:
                    log.debug("stage %s has no interest on its subject yet (reconnecting?)", node_id)
                    if time.monotonic() > deadline:
                        return
                    await asyncio.sleep(self.config.check_every_s / 5)
                    continue
                except NatsTimeout:  # subscribed, only slow to answer: work sent to it arrives
                    pass
                self._reachable[node_id] = self._reconnects

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _ranges(self) -> list[tuple[int, int]]:
        return [n.layers for n in self.registry.serving(self.config.model)]

    async def _send(self, rid: str, prompt_ids: list[int], params: SamplingParams, chain: list[tuple[int, int]],
                    prefix_cache: bool, route: tuple[str, ...], trace: TraceContext | None = None) -> None:
        """Publish the prompt to the first node of ``route``, the whole route pinned in the meta."""
        meta = RequestMeta(reply=self.subject, chain=tuple(chain), route=route, sampling=params,
                           prompt_ids=tuple(prompt_ids), prefix_cache=prefix_cache)
        item = ForwardItem(rid=rid, pos=0, n=len(prompt_ids), meta=meta)
        ids = np.asarray(prompt_ids, dtype="<i4").tobytes()
        payload = encode(Forward(items=(item,), dtype="int32", shape=(len(prompt_ids),)), ids)
        headers = trace_header({rid: trace.child()}) if trace is not None else None
        await chunks.publish(self.nc, subjects.node(self.config.model, *chain[0], route[0]), payload, headers)

    async def _next(self, queue: asyncio.Queue, chain: list[tuple[int, int]], route: tuple[str, ...], first: bool,
                    request: _Request) -> TokenOut:
        """The next token of the current try. Raises :class:`HopLost` when a stage of ``route`` is
        gone or no token came for ``stall_timeout_s`` after the first one, :class:`StageFailed` when
        the first token takes longer than ``first_token_timeout_s`` (a prompt may take minutes)."""
        limit = self.config.first_token_timeout_s if first else self.config.stall_timeout_s
        deadline = time.monotonic() + limit
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), self.config.check_every_s)
            except asyncio.TimeoutError:
                request.check()
                self._check_alive(chain, route)
                if time.monotonic() > deadline:
                    if first:
                        raise StageFailed(f"no token from the pipeline within {limit:.0f} s") from None
                    raise HopLost(f"no token from route {' -> '.join(route)} for {limit:g} s") from None
                continue
            if event is _CANCELLED:
                request.check()
            if event is _RECONNECTED:
                raise HopLost("this gateway's NATS connection was lost and is back")
            if isinstance(event, ErrorMsg):
                raise (Retry(event.message, event.code) if event.code in RETRYABLE else StageFailed(event.message))
            return event

    def _check_alive(self, chain: list[tuple[int, int]], route: tuple[str, ...]) -> None:
        """Raise :class:`HopLost` when a replica the request is pinned to left the registry or its range."""
        nodes = {n.node_id: n for n in self.registry.serving(self.config.model)}
        for node_id, (a, b) in zip(route, chain):
            if node_id not in nodes:
                raise HopLost(f"stage {node_id} serving layers {a}:{b} stopped while serving the request")
            if nodes[node_id].layers != (a, b):
                raise HopLost(f"stage {node_id} stopped serving layers {a}:{b} while serving the request")

    async def _on_reply(self, msg: Msg) -> None:
        try:
            received = self._reassembler.receive(msg.data, msg.headers)
            header = received[0] if received else None
            if header is not None and not isinstance(header, (Tokens, ErrorMsg)):
                raise WireError(f"a gateway takes tokens or error messages, not {header.kind!r}")
        except WireError as e:
            log.warning("dropped malformed reply: %s", e)
            if msg.reply:
                await self.nc.publish(msg.reply, encode(ErrorMsg(message=f"malformed message: {e}", node=self.gateway_id)))
            return
        if isinstance(header, Tokens):
            for item in header.items:
                self._deliver(item.rid, item)
        elif isinstance(header, ErrorMsg):
            self._deliver(header.rid, header)

    def _deliver(self, rid: str | None, event) -> None:
        queue = self._streams.get(rid) if rid else None
        if queue is None:  # a finished, abandoned or unknown try: its late messages go nowhere
            log.debug("dropped %s for request %s, which is not running here", type(event).__name__, rid)
            return
        queue.put_nowait(event)
