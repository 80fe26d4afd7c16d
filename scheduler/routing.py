"""Pick a chain of layer ranges that covers 0..L, and name what is missing when none does."""

from __future__ import annotations

from collections.abc import Iterable

Range = tuple[int, int]


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
