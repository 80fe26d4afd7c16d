"""Previous assignments: the surviving chains (a min-cost flow over layer boundaries) and their gaps."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from parallax.scheduler.graph import Edge, min_cost_paths
from parallax.scheduler.planner.fill import _Anchor, _Context
from parallax.scheduler.planner.types import _EPS, NodeCapacity


def _chains(anchors: Sequence[_Anchor], num_layers: int,
            gaps: bool = False) -> tuple[list[list[_Anchor]], list[_Anchor]]:
    """Node-disjoint chains from layer 0 to L made of ``anchors``, keeping as many kept auto nodes as
    possible (then as many fixed ones), by a min-cost flow over layer boundaries; and the anchors left over.

    With ``gaps``, a chain may jump over layers nobody holds (at a small cost per jump): the broken chains
    that repairs fill.
    """
    weight = 2 * len(anchors) + 4
    edges: list[Edge] = [(a.start, a.end, -weight if a.extendable else -1, 1) for a in anchors]
    if gaps:
        froms = {0} | {a.end for a in anchors}
        tos = {num_layers} | {a.start for a in anchors}
        edges += [(p, q, 2, len(anchors)) for p in sorted(froms) for q in sorted(tos) if p < q]
    chains = []
    for path in min_cost_paths(edges, num_layers):
        chains.append([anchors[i] for i in path if i < len(anchors)])
    used = {id(a) for chain in chains for a in chain}
    return [c for c in chains if c], [a for a in anchors if id(a) not in used]


def _swap_twins(chains: list[list[_Anchor]], rest: list[_Anchor]) -> tuple[list[list[_Anchor]], list[_Anchor]]:
    """Let the fastest of the anchors with the same range and kind serve in the chains."""
    rest = list(rest)
    for chain in chains:
        for k, anchor in enumerate(chain):
            twins = [a for a in rest if (a.start, a.end, a.extendable) == (anchor.start, anchor.end, anchor.extendable)]
            fastest = min(twins, key=lambda a: (a.node.layer_ms, a.node.node_id), default=None)
            if fastest is not None and fastest.node.layer_ms < anchor.node.layer_ms:
                rest[rest.index(fastest)] = anchor
                chain[k] = fastest
    return chains, rest


def _complete(chain: Sequence[_Anchor], num_layers: int) -> bool:
    """Whether sorted, non-overlapping ``chain`` covers ``0..num_layers`` without a gap."""
    return chain[0].start == 0 and chain[-1].end == num_layers and all(a.end == b.start for a, b in pairwise(chain))


def _chain_time(chain: Sequence[_Anchor], hop_ms: float) -> float:
    return max((a.end - a.start) * a.node.layer_ms for a in chain) + hop_ms


def _swap_tails(chains: list[list[_Anchor]], hop_ms: float) -> list[list[_Anchor]]:
    """Re-pair two chains at their common boundaries while that raises their throughput (zero moves)."""
    improved = True
    while improved:
        improved = False
        for i in range(len(chains)):
            for j in range(i + 1, len(chains)):
                swapped = _best_pairing(chains[i], chains[j], hop_ms)
                if swapped is not None:
                    chains[i], chains[j] = swapped
                    improved = True
    return chains


def _best_pairing(a: list[_Anchor], b: list[_Anchor], hop_ms: float) -> tuple[list[_Anchor], list[_Anchor]] | None:
    """The best of all ways to re-pair two chains at their shared boundaries (at most 2^10 tried), if better."""
    shared = sorted({x.start for x in a[1:]} & {x.start for x in b[1:]})[:10]

    def rate(pair: tuple[list[_Anchor], list[_Anchor]]) -> float:
        return 1 / _chain_time(pair[0], hop_ms) + 1 / _chain_time(pair[1], hop_ms)

    best, best_rate = None, rate((a, b)) * (1 + _EPS)
    for mask in range(1, 1 << len(shared)):
        na, nb = list(a), list(b)
        for bit, pos in enumerate(shared):
            if mask >> bit & 1:
                ia = next(k for k, x in enumerate(na) if x.start == pos)
                ib = next(k for k, x in enumerate(nb) if x.start == pos)
                na, nb = na[:ia] + nb[ib:], nb[:ib] + na[ia:]
        if rate((na, nb)) > best_rate:
            best, best_rate = (na, nb), rate((na, nb))
    return best


def _groups(anchors: Sequence[_Anchor]) -> list[list[_Anchor]]:
    """Non-overlapping groups (interval partitioning), preferring to join a group the anchor extends exactly."""
    groups: list[list[_Anchor]] = []
    for anchor in sorted(anchors, key=lambda a: (a.start, a.end, a.node.node_id)):
        fits = [g for g in groups if g[-1].end <= anchor.start]
        if fits:
            max(fits, key=lambda g: (g[-1].end == anchor.start, g[-1].end)).append(anchor)
        else:
            groups.append([anchor])
    return groups


def _kept(ctx: _Context, auto: Sequence[NodeCapacity]) -> list[_Anchor]:
    """Auto nodes whose previous range is still valid for this model and still fits their memory."""
    out = []
    for node in auto:
        before = ctx.previous.get(node.node_id)
        if before is None or len(before) != 2:
            continue
        start, end = before
        if isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= ctx.L and \
                end - start <= ctx.cap(node, start == 0, end == ctx.L):
            out.append(_Anchor(node, start, end, True))
    return out
