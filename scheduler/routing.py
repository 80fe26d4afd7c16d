"""Pick the replicas of a request's route: one serving node per hop, covering layers 0..L.

:func:`choose_route` picks concrete replicas from the registry's :class:`NodeInfo` values, by expected
time ("load") or in turn ("round-robin"). The walks over bare ranges (:func:`find_chain`,
:func:`missing_ranges`, the fewest-hop chains) are :mod:`parallax.scheduler.graph`'s; the first two are
re-exported here for the gateway. No torch, no NATS here.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from parallax.broker.registry import NodeInfo
from parallax.scheduler.graph import Range, find_chain, missing_ranges, shortest_chains

__all__ = ["DEFAULT_LAYER_MS", "HOP_MS", "POLICIES", "Hop", "Policy", "Range", "RouteState", "choose_route",
           "find_chain", "missing_ranges", "node_cost", "queue_length"]

Hop = tuple[str, int, int]  # (node id, start, end)
Policy = Literal["load", "round-robin"]
POLICIES: tuple[Policy, ...] = ("load", "round-robin")
HOP_MS = 1.0  # fixed cost of one more hop (a NATS round through the server), in ms
DEFAULT_LAYER_MS = 1.0  # used when no node of the model has a measured or estimated layer_ms


# --- concrete replicas -------------------------------------------------------------------------
@dataclass
class RouteState:
    """What one gateway remembers between routing decisions.

    ``inflight``: requests this gateway has pinned to each node and not yet seen finish (the
    registry's load lags by up to a heartbeat, so a burst of requests would otherwise all go to the
    node that looked idle a second ago). ``turn``: the round-robin counter. ``routed``: requests
    pinned to each node since the start (for logs, tests and benchmarks).
    """

    inflight: Counter[str] = field(default_factory=Counter)
    routed: Counter[str] = field(default_factory=Counter)
    turn: int = 0

    def acquire(self, route: Sequence[Hop]) -> None:
        for node_id, _, _ in route:
            self.inflight[node_id] += 1
            self.routed[node_id] += 1

    def release(self, route: Sequence[Hop]) -> None:
        for node_id, _, _ in route:
            self.inflight[node_id] -= 1
            if self.inflight[node_id] <= 0:
                del self.inflight[node_id]


def queue_length(node: NodeInfo, state: RouteState | None) -> int:
    """Requests on ``node``: ``max(registry running + waiting, this gateway's local in-flight count)``.

    The registry counts every gateway's requests but is up to a heartbeat old; the local count is
    current but sees only this gateway's. The larger of the two is a lower bound on the truth that
    reacts at once to what this gateway has just sent."""
    registered = node.load.running + node.load.waiting
    return max(registered, state.inflight.get(node.node_id, 0) if state is not None else 0)


def node_cost(node: NodeInfo, default_layer_ms: float, state: RouteState | None, hop_ms: float = HOP_MS) -> float:
    """Expected ms a new request spends on ``node`` per token: its layers at its measured speed,
    slowed down by every request already there (``1 + queue``: a step over ``q`` others takes
    longer, or the request waits behind them), plus the cost of the hop itself."""
    own = (node.end - node.start) * _layer_ms(node, default_layer_ms)
    return own * (1 + queue_length(node, state)) + hop_ms


def _layer_ms(node: NodeInfo, default: float) -> float:
    return node.layer_ms if node.layer_ms is not None and node.layer_ms > 0 else default


def _default_layer_ms(nodes: Iterable[NodeInfo]) -> float:
    """The median of the known ``layer_ms`` (for a node that has none yet), else ``DEFAULT_LAYER_MS``."""
    known = [n.layer_ms for n in nodes if n.layer_ms is not None and n.layer_ms > 0]
    return statistics.median(known) if known else DEFAULT_LAYER_MS


def choose_route(nodes: Sequence[NodeInfo], num_layers: int, policy: Policy = "load", state: RouteState | None = None,
                 hop_ms: float = HOP_MS) -> list[Hop] | None:
    """One serving node per hop from layer 0 to ``num_layers``, or None when no chain is complete.

    ``"load"``: the chain with the least expected time, the sum over its hops of :func:`node_cost`
    (``layers * layer_ms * (1 + queue) + hop_ms``; ``layer_ms`` is what the stage measured per step
    and layer, the median of the known ones for a node that has none yet; ``queue`` is
    :func:`queue_length`, the larger of the registry's load and ``state.inflight``); ties go to the
    fewest hops, then to the smaller node ids. ``"round-robin"``: the next of the complete chains
    with the fewest hops (every combination of replicas, in node-id order), ``state.turn`` advancing
    by one per call. The caller pins the route and calls ``state.acquire``/``state.release``.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown routing policy {policy!r}; expected one of {', '.join(POLICIES)}")
    usable: dict[str, NodeInfo] = {}
    for n in nodes:
        if n.serves and 0 <= n.start < n.end <= num_layers and n.node_id not in usable:
            usable[n.node_id] = n
    candidates = sorted(usable.values(), key=lambda n: (n.start, n.node_id))
    if policy == "round-robin":
        state = state if state is not None else RouteState()
        return _round_robin(candidates, num_layers, state)
    return _cheapest(candidates, num_layers, state, hop_ms)


def _cheapest(nodes: list[NodeInfo], num_layers: int, state: RouteState | None, hop_ms: float) -> list[Hop] | None:
    default = _default_layer_ms(nodes)
    # Ranges only go forward (start < end), so boundaries in increasing order are a topological order.
    best: dict[int, tuple[tuple[float, int, tuple[str, ...]], list[Hop]]] = {0: ((0.0, 0, ()), [])}
    for node in nodes:  # sorted by start
        here = best.get(node.start)
        if here is None:
            continue
        (cost, hops, ids), route = here
        key = (round(cost + node_cost(node, default, state, hop_ms), 9), hops + 1, ids + (node.node_id,))
        if node.end not in best or key < best[node.end][0]:
            best[node.end] = (key, route + [(node.node_id, node.start, node.end)])
    found = best.get(num_layers)
    return None if found is None else found[1]


def _round_robin(nodes: list[NodeInfo], num_layers: int, state: RouteState) -> list[Hop] | None:
    replicas: dict[Range, list[str]] = {}
    for n in nodes:
        replicas.setdefault((n.start, n.end), []).append(n.node_id)
    chains = list(shortest_chains(replicas, num_layers))
    if not chains:
        return None
    sizes = [math.prod(len(replicas[r]) for r in chain) for chain in chains]
    k = state.turn % sum(sizes)
    state.turn += 1
    for chain, size in zip(chains, sizes):
        if k >= size:
            k -= size
            continue
        route: list[Hop] = []
        for a, b in reversed(chain):  # mixed radix, the last hop turning fastest
            ids = replicas[(a, b)]
            k, digit = divmod(k, len(ids))
            route.append((ids[digit], a, b))
        return route[::-1]
    raise AssertionError("unreachable")
