"""Pipeline skeletons (anchors: fixed or kept ranges, and the gaps between them), and filling a gap.

Within one gap with a given node set, layers are water-filled (:func:`_water_fill`): each goes to the
node whose stage time grows least; the nodes with the most spare room take layer 0 and layer ``L - 1``.
:class:`_Context` builds (and memoizes) the pipeline of a skeleton and the nodes filling its gaps.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from parallax.scheduler.planner.types import _EPS, ModelCost, NodeCapacity, max_layers


@dataclass(frozen=True)
class _Anchor:
    """A range that stays in place: a fixed node's (never grows) or a kept previous one (may grow)."""

    node: NodeCapacity
    start: int
    end: int
    extendable: bool


@dataclass(frozen=True)
class _Gap:
    """Layers ``[start, end)`` of a pipeline not yet served; ``left``/``right`` anchors may grow into it."""

    start: int
    end: int
    left: _Anchor | None
    right: _Anchor | None


@dataclass(frozen=True)
class _Frame:
    """The skeleton of one pipeline: its anchors and gaps (a plain pipeline is one gap ``0..L``)."""

    anchors: tuple[_Anchor, ...]
    gaps: tuple[_Gap, ...]


def _frame(anchors: Sequence[_Anchor], num_layers: int) -> _Frame:
    """Gaps between sorted, non-overlapping anchors; a growing anchor takes its right gap, else its left one."""
    ordered = tuple(sorted(anchors, key=lambda a: a.start))
    gaps, pos, prev = [], 0, None
    for index, anchor in enumerate(ordered):
        if anchor.start > pos:
            nxt = ordered[index + 1] if index + 1 < len(ordered) else None
            closed_right = anchor.end == num_layers or (nxt is not None and nxt.start == anchor.end)
            left = prev if prev is not None and prev.extendable else None
            right = anchor if anchor.extendable and closed_right else None
            gaps.append(_Gap(pos, anchor.start, left, right))
        pos, prev = anchor.end, anchor
    if pos < num_layers:
        gaps.append(_Gap(pos, num_layers, prev if prev is not None and prev.extendable else None, None))
    return _Frame(ordered, tuple(gaps))


@dataclass(frozen=True)
class _Built:
    """A complete pipeline: its placements (node, start, end) in order and its stage time in ms."""

    stages: tuple[tuple[NodeCapacity, int, int], ...]
    time: float

    @property
    def throughput(self) -> float:
        return 1000.0 / self.time


def _water_fill(total: int, parts: Sequence[tuple[float, int, int, int]]) -> list[int] | None:
    """Extra layers per part ``(layer_ms, base, room, minimum)`` summing to ``total`` with the least max time.

    Each further layer goes to the part whose time ``(base + x + 1) * layer_ms`` is smallest (exact for
    a min-max of increasing costs). Every layer cheaper than the continuous water level is certainly
    given, so those are handed out at once. None when the rooms cannot hold ``total`` or the minimums
    exceed it.
    """
    if any(minimum > room for _, _, room, minimum in parts):
        return None
    if sum(minimum for *_, minimum in parts) > total or sum(room for _, _, room, _ in parts) < total:
        return None
    level = _level(total, parts) * (1 - 1e-9)
    extra = [max(minimum, min(room, int(level / ms) - base)) for ms, base, room, minimum in parts]
    if sum(extra) > total:
        extra = [minimum for *_, minimum in parts]
    left = total - sum(extra)
    heap = [((base + x + 1) * ms, i) for i, ((ms, base, room, _), x) in enumerate(zip(parts, extra)) if x < room]
    heapq.heapify(heap)
    while left:
        _, i = heapq.heappop(heap)
        extra[i] += 1
        left -= 1
        ms, base, room, _ = parts[i]
        if extra[i] < room:
            heapq.heappush(heap, ((base + extra[i] + 1) * ms, i))
    return extra


def _level(total: int, parts: Sequence[tuple[float, int, int, int]]) -> float:
    """The stage time at which ``total`` layers fit if layers were divisible and rooms unlimited (a lower bound)."""
    inverse = held = 0.0
    ordered = sorted((base * ms, ms, base) for ms, base, _, _ in parts)
    level = 0.0
    for j, (_, ms, base) in enumerate(ordered):
        inverse += 1 / ms
        held += base
        level = (total + held) / inverse
        if j + 1 == len(ordered) or level <= ordered[j + 1][0]:
            break
    return level


class _Context:
    """The model, the previous assignments and the memo shared by one :func:`plan` call."""

    def __init__(self, model: ModelCost, previous: Mapping[str, tuple[int, int]]) -> None:
        self.model = model
        self.L = model.num_layers
        self.previous = previous
        self.memo: dict[tuple, _Built | None] = {}
        self._caps: dict[tuple[NodeCapacity, bool, bool], int] = {}

    def cap(self, node: NodeCapacity, first: bool = False, last: bool = False) -> int:
        key = (node, first, last)
        if key not in self._caps:
            self._caps[key] = max_layers(self.model, node, first, last)
        return self._caps[key]

    def best_cap(self, node: NodeCapacity) -> int:
        """The most layers ``node`` can hold in any role (layers of one size: ``cap(node)``)."""
        return max(self.cap(node, first, last) for first in (False, True) for last in (False, True))

    def order(self, nodes: frozenset[NodeCapacity]) -> list[NodeCapacity]:
        """Deterministic order of a gap's nodes: by previous start (stability), then node id."""
        def key(node: NodeCapacity) -> tuple[int, str]:
            before = self.previous.get(node.node_id)
            return (before[0] if before else self.L + 1, node.node_id)
        return sorted(nodes, key=key)

    def build(self, frame: _Frame, members: tuple[frozenset[NodeCapacity], ...]) -> _Built | None:
        """The pipeline of ``frame`` with ``members[g]`` filling gap ``g``, or None when it cannot be completed."""
        key = (frame, members)
        if key not in self.memo:
            self.memo[key] = self._build(frame, members)
        return self.memo[key]

    def _build(self, frame: _Frame, members: tuple[frozenset[NodeCapacity], ...]) -> _Built | None:
        ranges = {a.node.node_id: (a.node, a.start, a.end) for a in frame.anchors}
        if any(n.node_id in ranges for nodes in members for n in nodes) or \
                sum(map(len, members)) != len(frozenset().union(*members)):
            return None  # a node can serve one range only
        stages = []
        for gap, nodes in zip(frame.gaps, members):
            filled = _fill_gap(self, gap, self.order(nodes))
            if filled is None:
                return None
            for node, start, end in filled:
                if node.node_id in ranges:
                    ranges[node.node_id] = (node, start, end)
                else:
                    stages.append((node, start, end))
        stages = sorted([*ranges.values(), *stages], key=lambda s: s[1])
        time = max((end - start) * node.layer_ms for node, start, end in stages) + self.model.hop_ms
        return _Built(tuple(stages), time)


@dataclass(frozen=True)
class _Part:
    """A participant of a gap: a growing anchor (``kind`` left/right, ``base`` layers held) or a fresh node."""

    node: NodeCapacity
    kind: str
    base: int = 0


def _room(ctx: _Context, gap: _Gap, part: _Part, first: bool, last: bool) -> int:
    """Layers ``part`` can add in ``gap`` if it holds layer 0 (``first``) / layer L-1 (``last``)."""
    if part.kind == "left":
        return max(0, ctx.cap(part.node, gap.left.start == 0, last) - part.base)
    if part.kind == "right":
        return max(0, ctx.cap(part.node, first, gap.right.end == ctx.L) - part.base)
    return ctx.cap(part.node, first, last)


def _participants(gap: _Gap, fresh: Sequence[NodeCapacity]) -> list[_Part]:
    parts = [_Part(gap.left.node, "left", gap.left.end - gap.left.start)] if gap.left else []
    parts += [_Part(node, "fresh") for node in fresh]
    if gap.right:
        parts.append(_Part(gap.right.node, "right", gap.right.end - gap.right.start))
    return parts


def _fill_gap(ctx: _Context, gap: _Gap, fresh: Sequence[NodeCapacity]) -> list[tuple[NodeCapacity, int, int]] | None:
    """Ranges for the gap's participants (grown anchors with their whole new range), or None if it cannot be filled.

    First the relaxation without the first/last extras; if its water-fill leaves room for the extras on
    some node (the one with most spare room takes each role) it is optimal. Otherwise every role choice
    is tried.
    """
    parts = _participants(gap, fresh)
    size = gap.end - gap.start
    plain = [(p.node.layer_ms, p.base, _relaxed_room(ctx, gap, p), 0) for p in parts]
    extra = _water_fill(size, plain)
    if extra is None:
        return None
    order = _roles(ctx, gap, parts, extra)
    if order is None:
        best = _fill_roles(ctx, gap, parts)
        if best is None:
            return None
        extra, order = best
    return _lay_out(gap, parts, extra, order)


def _relaxed_room(ctx: _Context, gap: _Gap, part: _Part) -> int:
    """The most layers ``part`` can add in ``gap`` in any role the gap has (layers of one size: without the
    first/last extras; layers of different sizes: a node may hold more of the small first or last layers)."""
    roles = [(first, last) for first in (False, gap.start == 0) for last in (False, gap.end == ctx.L)]
    return max(_room(ctx, gap, part, first, last) for first, last in set(roles))


def _others_fit(ctx: _Context, gap: _Gap, parts: list[_Part], extra: list[int], roled: set[int]) -> bool:
    """Whether the parts that hold neither layer 0 nor L-1 (not in ``roled``) fit what the fill gives them."""
    return all(_spare(ctx, gap, p, extra[i], False, False) >= 0 for i, p in enumerate(parts)
               if extra[i] > 0 and i not in roled)


def _spare(ctx: _Context, gap: _Gap, part: _Part, x: int, first: bool, last: bool) -> int:
    return _room(ctx, gap, part, first, last) - x


def _roles(ctx: _Context, gap: _Gap, parts: list[_Part], extra: list[int]) -> list[int] | None:
    """Order of the fresh participants if the relaxed fill ``extra`` also fits with the extras, else None."""
    need_first, need_last = gap.start == 0, gap.end == ctx.L
    active = [i for i, p in enumerate(parts) if p.kind == "fresh" and extra[i] > 0]
    if not active:  # only growing anchors: one of them may now hold layer 0 or L-1
        roled = set()
        for i, p in enumerate(parts):
            first = need_first and p.kind == "right" and extra[i] > 0
            last = need_last and p.kind == "left" and extra[i] > 0
            if (first or last) and _spare(ctx, gap, p, extra[i], first, last) < 0:
                return None
            if first or last:
                roled.add(i)
        return [] if _others_fit(ctx, gap, parts, extra, roled) else None

    def pick(pool: list[int], first: bool, last: bool) -> int | None:
        spare = [(_spare(ctx, gap, parts[i], extra[i], first, last), -i) for i in pool]
        best = max(spare, default=None)
        return None if best is None or best[0] < 0 else -best[1]

    if need_first and need_last and len(active) == 1:
        return active if pick(active, True, True) is not None else None
    f = pick(active, True, False) if need_first else None
    if need_first and f is None:
        return None
    rest = [i for i in active if i != f]
    l = pick(rest, False, True) if need_last else None
    if need_last and l is None and need_first:  # take the last role first, then the first
        l = pick(active, False, True)
        f = pick([i for i in active if i != l], True, False) if l is not None else None
        if f is None:
            return None
    elif need_last and l is None:
        return None
    if not _others_fit(ctx, gap, parts, extra, {f, l}):
        return None
    middle = [i for i in active if i not in (f, l)]
    return ([f] if f is not None else []) + middle + ([l] if l is not None else [])


def _fill_roles(ctx: _Context, gap: _Gap, parts: list[_Part]) -> tuple[list[int], list[int]] | None:
    """Every choice of who holds layer 0 / L-1, water-filled; the one with the least max time."""
    need_first, need_last = gap.start == 0, gap.end == ctx.L
    fresh = [i for i, p in enumerate(parts) if p.kind == "fresh"]
    anchor = {p.kind: i for i, p in enumerate(parts) if p.kind != "fresh"}
    firsts = fresh + ([anchor["right"]] if "right" in anchor else []) if need_first else [None]
    lasts = fresh + ([anchor["left"]] if "left" in anchor else []) if need_last else [None]
    size, best = gap.end - gap.start, None
    for f in firsts:
        for l in lasts:
            spec = _role_spec(ctx, gap, parts, f, l, size)
            extra = _water_fill(size, spec)
            if extra is None:
                continue
            time = max((p.base + x) * p.node.layer_ms for p, x in zip(parts, extra))
            if best is None or time < best[0] - _EPS:
                middle = [i for i in fresh if extra[i] > 0 and i not in (f, l)]
                order = ([f] if f in fresh else []) + middle + ([l] if l in fresh and l != f else [])
                best = (time, extra, order)
    return None if best is None else (best[1], best[2])


def _role_spec(ctx: _Context, gap: _Gap, parts: list[_Part], f: int | None, l: int | None,
               size: int) -> list[tuple[float, int, int, int]]:
    """Water-fill input when part ``f`` holds layer 0 and part ``l`` holds layer L-1 (None: not needed)."""
    alone = (f is not None and f == l) or (f is not None and parts[f].kind == "right") or \
        (l is not None and parts[l].kind == "left")
    spec = []
    for i, p in enumerate(parts):
        first, last = i == f, i == l
        room = _room(ctx, gap, p, first, last)
        if alone and not (first or last):
            room = 0 if p.kind == "fresh" else room
        minimum = size if alone and (first or last) else (1 if first or last else 0)
        spec.append((p.node.layer_ms, p.base, room, minimum))
    return spec


def _lay_out(gap: _Gap, parts: list[_Part], extra: list[int], order: list[int]) -> list[tuple[NodeCapacity, int, int]]:
    """Concrete ranges: the left anchor grows right, fresh nodes in ``order``, the right anchor grows left."""
    out, pos = [], gap.start
    for i, p in enumerate(parts):
        if p.kind == "left":
            out.append((p.node, gap.left.start, gap.start + extra[i]))
            pos += extra[i]
    for i in order:
        out.append((parts[i].node, pos, pos + extra[i]))
        pos += extra[i]
    for i, p in enumerate(parts):
        if p.kind == "right":
            out.append((p.node, gap.end - extra[i], gap.right.end))
    return out
