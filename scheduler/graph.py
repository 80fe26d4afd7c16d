"""The layer-range graph: layer boundaries ``0..L`` are its vertices, a range ``[a, b)`` is an edge ``a -> b``.

A chain of ranges from 0 to ``L``, each starting where the one before ends, is a path, and a pipeline
is one. Everything here works on bare ranges: the boundaries reachable from 0 (:func:`reachable`), the
chains with the fewest hops (:func:`shortest_chains`, :func:`find_chain`), what is missing when no chain
exists (:func:`missing_ranges`), how many chains can run at once with no range shared
(:func:`disjoint_chains`), and the min-cost flow over boundaries the planner recovers surviving
pipelines with (:func:`min_cost_paths`). Routing, ``parallax status`` and the planner all use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

Range = tuple[int, int]
Edge = tuple[int, int, int, int]  # (from boundary, to boundary, cost, capacity)


def _successors(ranges: Iterable[Range]) -> dict[int, list[int]]:
    """``a -> [b, ...]`` (ascending, no repeats) for every range ``(a, b)``."""
    out: dict[int, list[int]] = {}
    for a, b in sorted(set(ranges)):
        out.setdefault(a, []).append(b)
    return out


def _hops(successors: dict[int, list[int]], source: int) -> dict[int, int]:
    """Breadth-first: the fewest hops from ``source`` to every boundary it reaches."""
    hops, frontier = {source: 0}, [source]
    while frontier:
        nxt = []
        for a in frontier:
            for b in successors.get(a, ()):
                if b not in hops:
                    hops[b] = hops[a] + 1
                    nxt.append(b)
        frontier = nxt
    return hops


def reachable(ranges: Iterable[Range], start: int = 0) -> set[int]:
    """The boundaries some chain of ``ranges`` reaches from ``start`` (``start`` included)."""
    return set(_hops(_successors(ranges), start))


def shortest_chains(ranges: Iterable[Range], end: int) -> Iterator[list[Range]]:
    """Every chain from 0 to ``end`` with the fewest hops, in lexicographic order (lazily: the first is cheap)."""
    forward = _successors(ranges)
    backward: dict[int, list[int]] = {}
    for a, targets in forward.items():
        for b in targets:
            backward.setdefault(b, []).append(a)
    depth, to_end = _hops(forward, 0), _hops(backward, end)
    if end not in depth:
        return
    hops = depth[end]

    def walk(a: int, path: list[Range]) -> Iterator[list[Range]]:
        if len(path) == hops:
            yield list(path)
            return
        for b in forward.get(a, ()):  # only boundaries on some shortest chain: no dead ends are explored
            if depth.get(b) == len(path) + 1 and to_end.get(b) == hops - len(path) - 1:
                path.append((a, b))
                yield from walk(b, path)
                path.pop()

    yield from walk(0, [])


def find_chain(ranges: Iterable[Range], end: int) -> list[Range] | None:
    """The first chain with the fewest hops from layer 0 to ``end`` (ranges join end to start), or None."""
    return next(shortest_chains(ranges, end), None)


def missing_ranges(ranges: Iterable[Range], end: int) -> list[Range]:
    """Layer ranges no range covers; if all are covered but no chain joins up, the gap after the farthest chain."""
    ranges = list(ranges)
    covered = [False] * end
    for a, b in ranges:
        for i in range(max(a, 0), min(b, end)):
            covered[i] = True
    gaps = _runs([i for i, c in enumerate(covered) if not c])
    reach = reachable(ranges)
    if gaps or end in reach:
        return gaps
    return [(max(b for b in reach if b < end), end)]


def _runs(indices: list[int]) -> list[Range]:
    """Ascending indices as maximal runs ``[first, last + 1)``."""
    runs: list[Range] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def disjoint_chains(ranges: Iterable[Range], end: int) -> int:
    """How many chains from 0 to ``end`` can be formed at once with every range used at most once (a max flow).

    A range costs minus its length, so every unit of flow from 0 to ``end`` costs ``-end``: the min-cost
    augmentation of :func:`min_cost_paths` goes on until the flow is maximal.
    """
    return len(min_cost_paths([(a, b, a - b, 1) for a, b in ranges], end))


def min_cost_paths(edges: Sequence[Edge], end: int) -> list[list[int]]:
    """Min-cost flow from boundary 0 to ``end`` (augmenting while a path of negative cost exists),
    split into paths of edge indices (earlier edges first where a path could go on by several)."""
    if end <= 0:
        raise ValueError(f"a chain must end past boundary 0, got {end}")
    flow = [0] * len(edges)
    while _augment(edges, flow, end):
        pass
    paths = []
    while True:
        pos, path = 0, []
        while pos != end:
            i = next((i for i, e in enumerate(edges) if flow[i] > 0 and e[0] == pos), None)
            if i is None:
                return paths
            flow[i] -= 1
            path.append(i)
            pos = edges[i][1]
        paths.append(path)


def _augment(edges: Sequence[Edge], flow: list[int], end: int) -> bool:
    """Push one unit along the cheapest residual path from 0 to ``end`` (Bellman-Ford) if its cost is negative."""
    dist: dict[int, int] = {0: 0}
    parent: dict[int, tuple[int, int]] = {}
    for _ in range(len(edges) + 1):
        changed = False
        for i, (src, dst, cost, cap) in enumerate(edges):
            if flow[i] < cap and src in dist and dist[src] + cost < dist.get(dst, 1 << 62):
                dist[dst], parent[dst], changed = dist[src] + cost, (i, 1), True
            if flow[i] > 0 and dst in dist and dist[dst] - cost < dist.get(src, 1 << 62):
                dist[src], parent[src], changed = dist[dst] - cost, (i, -1), True
        if not changed:
            break
    if dist.get(end, 0) >= 0:
        return False
    pos, steps = end, 0
    while pos != 0 and steps <= len(edges):
        i, direction = parent[pos]
        flow[i] += direction
        pos = edges[i][0] if direction > 0 else edges[i][1]
        steps += 1
    return True
