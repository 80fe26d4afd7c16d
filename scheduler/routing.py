"""Pick a chain of layer ranges that covers 0..L, and name what is missing when none does.

:func:`find_chain` and :func:`missing_ranges` work on bare ranges; :func:`choose_route` picks concrete
replicas (one node per hop) from the registry's :class:`NodeInfo` values, by expected time ("load")
or in turn ("round-robin"). No torch, no NATS here.
"""

from __future__ import annotations

import math

import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from parallax.broker.registry import NodeInfo

Range = tuple[int, int]
Hop = tuple[str, int, int]  # (node id, start, end)
Policy = Literal["load", "round-robin"]
POLICIES: tuple[Policy, ...] = ("load", "round-robin")
HOP_MS = 1.0  # fixed cost of one more hop (a NATS round through the server), in ms
DEFAULT_LAYER_MS = 1.0  # used when no node of the model has a measured or estimated layer_ms


def find_chain(ranges: Iterable[Range], num_layers: int) -> list[Range] | None:
    """The chain with the fewest hops from layer 0 to ``num_layers`` (ranges join end to start)."""
    by_start: dict[int, set[int]] = {}
    for a, b in ranges:
        by_start.setdefault(a, set()).add(b)
    best: dict[int, list[Range]] = {0: []}
    frontier = [0]
    while frontier:  # breadth-first: the first time a boundary is reached uses the fewest hops
        nxt = []
        for a in frontier:
            for b in sorted(by_start.get(a, ())):
                if b not in best:
                    best[b] = best[a] + [(a, b)]
                    nxt.append(b)
        frontier = nxt
    return best.get(num_layers)


def missing_ranges(ranges: Iterable[Range], num_layers: int) -> list[Range]:
    """Layer ranges no node covers; if all are covered but no chain joins up, the gaps between chains."""
    ranges = list(ranges)
    covered = [False] * num_layers
    for a, b in ranges:
        for i in range(max(a, 0), min(b, num_layers)):
            covered[i] = True
    gaps = _runs([i for i, c in enumerate(covered) if not c])
    if gaps or find_chain(ranges, num_layers) is not None:
        return gaps
    reach = _reachable(ranges)
    stuck = max(b for b in reach if b < num_layers)
    return [(stuck, num_layers)]


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
    chains = _shortest_range_chains(list(replicas), num_layers)
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


def _shortest_range_chains(ranges: list[Range], num_layers: int) -> list[list[Range]]:
    """Every chain of ranges from 0 to ``num_layers`` with the fewest hops, in lexicographic order."""
    by_start: dict[int, list[int]] = {}
    for a, b in sorted(ranges):
        by_start.setdefault(a, []).append(b)
    depth, frontier = {0: 0}, [0]
    while frontier and num_layers not in depth:
        nxt = []
        for a in frontier:
            for b in by_start.get(a, ()):
                if b not in depth:
                    depth[b] = depth[a] + 1
                    nxt.append(b)
        frontier = nxt
    if num_layers not in depth:
        return []
    hops = depth[num_layers]
    chains: list[list[Range]] = []

    def walk(a: int, path: list[Range]) -> None:
        if a == num_layers:
            chains.append(list(path))
            return
        for b in by_start.get(a, ()):
            if depth.get(b) == len(path) + 1 and len(path) + 1 <= hops:
                path.append((a, b))
                walk(b, path)
                path.pop()

    walk(0, [])
    return chains


def _reachable(ranges: list[Range]) -> set[int]:
    reach, changed = {0}, True
    while changed:
        changed = False
        for a, b in ranges:
            if a in reach and b not in reach:
                reach.add(b)
                changed = True
    return reach


def _runs(indices: list[int]) -> list[Range]:
    runs: list[Range] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
