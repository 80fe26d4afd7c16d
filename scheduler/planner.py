"""Layer allocator: which node serves which layers, in how many pipelines (pure Python).

A model has ``L`` decoder layers. A *pipeline* is a chain of nodes, each serving a contiguous half-open
global range ``[start, end)``, together covering ``0..L`` once, in order. Several pipelines (replicas)
exist when the memory allows. :func:`plan` is called whenever nodes join or leave; the scheduler then
writes every node's range to the KV store.

Objective. Maximize the cluster's estimated decode throughput::

    throughput = sum over pipelines of 1000 / max over its stages of (layers * node.layer_ms + hop_ms)

tokens/s (the slowest stage bounds a pipeline, since micro-batches are in flight), with the fewest
hops. The choice is lexicographic: among the plans whose throughput is at least ``1 - tolerance`` times
the best found, prefer fewer stages (hops) in total, then fewer moved layers versus ``previous``
(layers a node must newly load; not counted without ``previous``), then higher throughput, then
node-id order. Stability: when ``previous`` is given, the plans that keep every still-usable previous
placement of an auto node (same node, same range, in a complete pipeline; the gaps left by departed
nodes filled by idle or new nodes, new replicas made of idle or new nodes) are the incumbents. Another
plan replaces them only if it is more than ``tolerance`` faster than the best of them (the best
incumbent is below ``1 - tolerance`` times its throughput); the lexicographic rule then picks among
such plans, otherwise among the incumbents.

Algorithm. Within one pipeline with a given node set, layers are water-filled: each layer goes to the
node whose stage time grows least (exactly the smallest stage time ``T`` with
``sum min(max_layers, floor((T - hop_ms) / layer_ms)) >= L``), so faster nodes get more layers and
nobody exceeds memory; the nodes with the most spare room take layer 0 (embeddings) and layer ``L - 1``
(final norm and lm_head). Nodes are spread over ``k = 1..K`` pipelines (``K`` bounded by the total
memory) greedily (the strongest node to the gap missing most capacity, then to the slowest estimated
pipeline), improved by
steepest ascent over single-node moves and two-node swaps, then pruned one node or pipeline at a time
(fewer hops) to give the tolerance rule its choices. With ``previous``, the surviving chains are
recovered (a min-cost flow over layer boundaries that keeps as many previous placements as it can),
and repair candidates keep them and fill their gaps by growing neighbours or with idle nodes, besides
the fresh plans. Hand-placed (``fixed``) ranges stay exactly as they are (their memory is the
operator's business and is not checked): conflicting ones go to different pipelines, auto nodes fill
the gaps, and fixed nodes left in no complete pipeline are reported in :attr:`Plan.partial`. If the
heuristics complete no pipeline, an exact search over chains (bounded to a few hundred thousand
states) decides between one complete pipeline and :class:`Unplaceable`, so a layer range is never left
unserved while the memory can serve it.

Compared with GradientHQ Parallax's allocator (a dynamic program over the number of pipelines that
maximizes ``k^2 / stages``, then FLOPs-proportional water-filling of layers), we maximize the estimated
tokens/s directly (stage time includes the per-hop cost and each node's measured speed) and, within a
tolerance, prefer fewer hops and fewer moved layers, so joins and departures disturb few nodes.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

from parallax.broker.errors import Unplaceable

_EPS = 1e-9
_STEPS_PER_NODE = 4  # local-search steps per free node, at most
_PEEL_STATES = 12  # pruned states of the first k that also get replicas of the nodes they free
_COVER_STATES = 200_000  # budget of the exact search used only when the heuristics place nothing


@dataclass(frozen=True)
class ModelCost:
    """Sizes and costs of a model, as the planner needs them."""

    num_layers: int
    layer_bytes: int
    kv_reserve_bytes: int
    first_bytes: int = 0
    last_bytes: int = 0
    hop_ms: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"a model needs at least 1 layer, got {self.num_layers!r}")
        for name in ("layer_bytes", "kv_reserve_bytes", "first_bytes", "last_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not self.hop_ms >= 0:
            raise ValueError(f"hop_ms must be >= 0, got {self.hop_ms!r}")

    @property
    def per_layer(self) -> int:
        """Bytes one served layer takes: weights plus its KV reserve."""
        return self.layer_bytes + self.kv_reserve_bytes


@dataclass(frozen=True)
class NodeCapacity:
    """What one node offers: memory for weights + KV reserve, and its speed."""

    node_id: str
    memory: int
    layer_ms: float
    fixed: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise ValueError(f"node_id must be a non-empty string, got {self.node_id!r}")
        if not isinstance(self.memory, int) or self.memory < 0:
            raise ValueError(f"memory of {self.node_id} must be an integer >= 0, got {self.memory!r}")
        if not self.layer_ms > 0:
            raise ValueError(f"layer_ms of {self.node_id} must be > 0, got {self.layer_ms!r}")
        if self.fixed is not None:
            if len(self.fixed) != 2 or not all(isinstance(v, int) for v in self.fixed):
                raise ValueError(f"fixed range of {self.node_id} must be (start, end), got {self.fixed!r}")
            if not 0 <= self.fixed[0] < self.fixed[1]:
                raise ValueError(f"fixed range of {self.node_id} must satisfy 0 <= start < end, got {self.fixed!r}")
            object.__setattr__(self, "fixed", tuple(self.fixed))


@dataclass(frozen=True)
class Placement:
    """One node serving the half-open global layer range ``[start, end)``."""

    node_id: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"placement of {self.node_id} must satisfy 0 <= start < end, got {self.start}:{self.end}")

    @property
    def layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Plan:
    """Pipelines (each covering ``0..L`` once, in order), idle nodes, and the estimated tokens/s.

    ``partial``: fixed (hand-placed) nodes that are in no complete pipeline; they keep their range and
    count in no pipeline's throughput.
    """

    pipelines: tuple[tuple[Placement, ...], ...]
    idle: tuple[str, ...]
    throughput: float
    partial: tuple[Placement, ...] = ()

    def __post_init__(self) -> None:
        ends = set()
        for pipeline in self.pipelines:
            if not pipeline or pipeline[0].start != 0:
                raise ValueError("every pipeline must start at layer 0")
            if any(a.end != b.start for a, b in pairwise(pipeline)):
                raise ValueError("a pipeline's ranges must be contiguous and in order")
            ends.add(pipeline[-1].end)
        if len(ends) > 1:
            raise ValueError(f"pipelines end at different layers: {sorted(ends)}")
        placed = [p.node_id for pipeline in self.pipelines for p in pipeline] + [p.node_id for p in self.partial]
        if len(placed) != len(set(placed)):
            raise ValueError("a node appears in more than one placement")
        if set(placed) & set(self.idle):
            raise ValueError("a node is both placed and idle")
        if not self.throughput >= 0:
            raise ValueError(f"throughput must be >= 0, got {self.throughput!r}")

    @property
    def stages(self) -> int:
        """Total number of stages (hops) over all pipelines."""
        return sum(len(pipeline) for pipeline in self.pipelines)

    def assignments(self) -> dict[str, tuple[int, int]]:
        """``node_id -> (start, end)`` of every placed node (pipelines and partial)."""
        placed = [p for pipeline in self.pipelines for p in pipeline] + list(self.partial)
        return {p.node_id: (p.start, p.end) for p in placed}

    def moved_layers(self, previous: Mapping[str, tuple[int, int]]) -> int:
        """Layers that nodes must newly load compared with ``previous`` (node_id -> (start, end))."""
        return sum(_new_layers(rng, previous.get(node)) for node, rng in self.assignments().items())


def _new_layers(now: tuple[int, int], before: tuple[int, int] | None) -> int:
    """Layers of ``now`` that ``before`` did not hold."""
    if before is None:
        return now[1] - now[0]
    overlap = max(0, min(now[1], before[1]) - max(now[0], before[0]))
    return now[1] - now[0] - overlap


def max_layers(model: ModelCost, node: NodeCapacity, first: bool = False, last: bool = False) -> int:
    """How many layers fit in ``node.memory`` (weights + KV reserve), counting first/last extras if it holds them."""
    room = node.memory - (model.first_bytes if first else 0) - (model.last_bytes if last else 0)
    if room < 0:
        return 0
    if model.per_layer == 0:
        return model.num_layers
    return min(model.num_layers, room // model.per_layer)


# ---------------------------------------------------------------------------------------------------
# Pipeline skeletons: anchors (fixed or kept ranges) and the gaps between them.


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


# ---------------------------------------------------------------------------------------------------
# Filling one gap: water-filling with the first/last roles.


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
    plain = [(p.node.layer_ms, p.base, _room(ctx, gap, p, False, False), 0) for p in parts]
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


def _spare(ctx: _Context, gap: _Gap, part: _Part, x: int, first: bool, last: bool) -> int:
    return _room(ctx, gap, part, first, last) - x


def _roles(ctx: _Context, gap: _Gap, parts: list[_Part], extra: list[int]) -> list[int] | None:
    """Order of the fresh participants if the relaxed fill ``extra`` also fits with the extras, else None."""
    need_first, need_last = gap.start == 0, gap.end == ctx.L
    active = [i for i, p in enumerate(parts) if p.kind == "fresh" and extra[i] > 0]
    if not active:  # only growing anchors: one of them may now hold layer 0 or L-1
        for i, p in enumerate(parts):
            first = need_first and p.kind == "right" and extra[i] > 0
            last = need_last and p.kind == "left" and extra[i] > 0
            if (first or last) and _spare(ctx, gap, p, extra[i], first, last) < 0:
                return None
        return []

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


# ---------------------------------------------------------------------------------------------------
# Spreading free nodes over pipelines: greedy start, local search, pruning.

_Members = tuple[tuple[frozenset[NodeCapacity], ...], ...]
_Where = tuple[int, int] | None  # (frame, gap) or idle


@dataclass(frozen=True)
class _State:
    """Frames (pipelines to be) and which free nodes fill which of their gaps."""

    frames: tuple[_Frame, ...]
    members: _Members


def _value(ctx: _Context, frame: _Frame, members: tuple[frozenset[NodeCapacity], ...]) -> tuple[float, int]:
    built = ctx.build(frame, members)
    return (0.0, 0) if built is None else (built.throughput, len(built.stages))


def _score(ctx: _Context, state: _State) -> tuple[float, int]:
    """(throughput, -stages) of the complete pipelines of ``state``."""
    values = [_value(ctx, f, m) for f, m in zip(state.frames, state.members)]
    return sum(v[0] for v in values), -sum(v[1] for v in values)


def _better(new: tuple[float, int], old: tuple[float, int]) -> bool:
    scale = _EPS * max(1.0, abs(old[0]))
    return new[0] > old[0] + scale or (abs(new[0] - old[0]) <= scale and new[1] > old[1])


def _initial(ctx: _Context, frames: Sequence[_Frame], free: Sequence[NodeCapacity]) -> _State:
    """Largest-deficit greedy: strongest nodes first, each to the gap missing most capacity, then to the slowest."""
    slots = [(i, g) for i, f in enumerate(frames) for g in range(len(f.gaps))]
    members = [[set() for _ in f.gaps] for f in frames]
    room = {s: frames[s[0]].gaps[s[1]].end - frames[s[0]].gaps[s[1]].start for s in slots}
    speed = dict.fromkeys(slots, 0.0)
    for node in sorted(free, key=lambda n: (-ctx.cap(n), n.layer_ms, n.node_id)):
        if not slots or ctx.cap(node) == 0:
            continue
        need = max(slots, key=lambda s: (room[s], -s[0], -s[1]))
        if room[need] <= 0:
            size = {s: frames[s[0]].gaps[s[1]].end - frames[s[0]].gaps[s[1]].start for s in slots}
            need = max(slots, key=lambda s: (size[s] / speed[s] if speed[s] else float("inf"), -s[0], -s[1]))
        members[need[0]][need[1]].add(node)
        room[need] -= ctx.cap(node)
        speed[need] += 1.0 / node.layer_ms
    return _State(tuple(frames), tuple(tuple(frozenset(g) for g in f) for f in members))


def _moved(state: _State, node: NodeCapacity, src: _Where, dst: _Where) -> _State:
    """``state`` with ``node`` taken from ``src`` and put in ``dst`` (None: idle)."""
    members = [list(f) for f in state.members]
    if src is not None:
        members[src[0]][src[1]] = members[src[0]][src[1]] - {node}
    if dst is not None:
        members[dst[0]][dst[1]] = members[dst[0]][dst[1]] | {node}
    return _State(state.frames, tuple(tuple(f) for f in members))


def _where(state: _State) -> dict[NodeCapacity, tuple[int, int]]:
    return {n: (i, g) for i, f in enumerate(state.members) for g, nodes in enumerate(f) for n in nodes}


def _delta_score(ctx: _Context, old: _State, new: _State, frames: set[int],
                 base: tuple[float, int]) -> tuple[float, int]:
    """Score of ``new`` computed from ``old``'s ``base`` by re-evaluating only the changed frames."""
    thr, neg = base
    for i in frames:
        before, after = _value(ctx, old.frames[i], old.members[i]), _value(ctx, new.frames[i], new.members[i])
        thr += after[0] - before[0]
        neg -= after[1] - before[1]
    return thr, neg


def _local_search(ctx: _Context, state: _State, free: Sequence[NodeCapacity]) -> _State:
    """Steepest ascent: apply the best single-node move (to another gap or idle), else the best swap of two
    nodes, while the score improves."""
    score = _score(ctx, state)
    for _ in range(_STEPS_PER_NODE * len(free) + 1):
        best = _best_move(ctx, state, free, score) or _best_swap(ctx, state, free, score)
        if best is None:
            break
        state, score = best
    return state


def _best_move(ctx: _Context, state: _State, free: Sequence[NodeCapacity],
               score: tuple[float, int]) -> tuple[_State, tuple[float, int]] | None:
    slots: list[_Where] = [(i, g) for i, f in enumerate(state.frames) for g in range(len(f.gaps))] + [None]
    where, best = _where(state), None
    for node in free:
        src = where.get(node)
        for dst in slots:
            if dst != src:
                new = _moved(state, node, src, dst)
                value = _delta_score(ctx, state, new, {s[0] for s in (src, dst) if s is not None}, score)
                if _better(value, score if best is None else best[1]):
                    best = (new, value)
    return best


def _best_swap(ctx: _Context, state: _State, free: Sequence[NodeCapacity],
               score: tuple[float, int]) -> tuple[_State, tuple[float, int]] | None:
    where, best = _where(state), None
    for a_index, a in enumerate(free):
        for b in free[a_index + 1:]:
            wa, wb = where.get(a), where.get(b)
            if wa != wb:
                new = _moved(_moved(state, a, wa, wb), b, wb, wa)
                value = _delta_score(ctx, state, new, {s[0] for s in (wa, wb) if s is not None}, score)
                if _better(value, score if best is None else best[1]):
                    best = (new, value)
    return best


def _prune(ctx: _Context, state: _State) -> list[_State]:
    """States with one node or one pipeline fewer at a time (the best such removal each time)."""
    out = []
    while True:
        options = []
        for node, (i, g) in sorted(_where(state).items(), key=lambda kv: kv[0].node_id):
            options.append(_moved(state, node, (i, g), None))
        for i in range(len(state.frames)):
            options.append(_State(state.frames[:i] + state.frames[i + 1:], state.members[:i] + state.members[i + 1:]))
        best = None
        for option in options:
            value = _score(ctx, option)
            if value[0] > 0 and (best is None or _better(value, best[0])):
                best = (value, option)
        if best is None:
            return out
        state = best[1]
        out.append(state)


# ---------------------------------------------------------------------------------------------------
# Previous assignments: surviving chains, their gaps.


_Edge = tuple[int, int, int, int]  # (from boundary, to boundary, cost, capacity)


def _chains(anchors: Sequence[_Anchor], num_layers: int,
            gaps: bool = False) -> tuple[list[list[_Anchor]], list[_Anchor]]:
    """Node-disjoint chains from layer 0 to L made of ``anchors``, keeping as many kept auto nodes as
    possible (then as many fixed ones), by a min-cost flow over layer boundaries; and the anchors left over.

    With ``gaps``, a chain may jump over layers nobody holds (at a small cost per jump): the broken chains
    that repairs fill.
    """
    weight = 2 * len(anchors) + 4
    edges: list[_Edge] = [(a.start, a.end, -weight if a.extendable else -1, 1) for a in anchors]
    if gaps:
        froms = {0} | {a.end for a in anchors}
        tos = {num_layers} | {a.start for a in anchors}
        edges += [(p, q, 2, len(anchors)) for p in sorted(froms) for q in sorted(tos) if p < q]
    chains = []
    for path in _flow_paths(edges, num_layers):
        chains.append([anchors[i] for i in path if i < len(anchors)])
    used = {id(a) for chain in chains for a in chain}
    return [c for c in chains if c], [a for a in anchors if id(a) not in used]


def _flow_paths(edges: Sequence[_Edge], num_layers: int) -> list[list[int]]:
    """Min-cost flow from boundary 0 to ``num_layers`` (augmenting while a path of negative cost exists),
    split into paths of edge indices (earlier edges first where a path could go on by several)."""
    flow = [0] * len(edges)
    while _augment(edges, flow, num_layers):
        pass
    paths = []
    while True:
        pos, path = 0, []
        while pos != num_layers:
            i = next((i for i, e in enumerate(edges) if flow[i] > 0 and e[0] == pos), None)
            if i is None:
                return paths
            flow[i] -= 1
            path.append(i)
            pos = edges[i][1]
        paths.append(path)


def _augment(edges: Sequence[_Edge], flow: list[int], num_layers: int) -> bool:
    """Push one unit along the cheapest residual path from 0 to L (Bellman-Ford) if its cost is negative."""
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
    if dist.get(num_layers, 0) >= 0:
        return False
    pos, steps = num_layers, 0
    while pos != 0 and steps <= len(edges):
        i, direction = parent[pos]
        flow[i] += direction
        pos = edges[i][0] if direction > 0 else edges[i][1]
        steps += 1
    return True


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


# ---------------------------------------------------------------------------------------------------
# Candidate plans and the choice among them.


def _fixed_anchors(nodes: Sequence[NodeCapacity]) -> list[_Anchor]:
    return [_Anchor(n, n.fixed[0], n.fixed[1], False) for n in nodes if n.fixed is not None]


def _replicas_bound(ctx: _Context, free: Sequence[NodeCapacity]) -> int:
    """How many plain pipelines the free nodes' memory could hold at most."""
    return min(len(free), sum(ctx.cap(n) for n in free) // ctx.L)


def _family(ctx: _Context, frames: list[_Frame], free: list[NodeCapacity]) -> list[_State]:
    """Local-search optima (and their prunings) for ``frames`` plus ``k = 0..K`` plain pipelines."""
    plain = _frame([], ctx.L)
    out, best, worse = [], -1.0, 0
    first = 0 if frames else 1
    for k in range(first, max(1, _replicas_bound(ctx, free)) + 1):
        state = _local_search(ctx, _initial(ctx, frames + [plain] * k, free), free)
        thr = _score(ctx, state)[0]
        out.append(state)
        for step, pruned in enumerate(_prune(ctx, state)):  # fewer hops, and for the first k also
            out.append(pruned)  # the pipelines left plus replicas made of the nodes freed (peeling)
            if k == first and step < _PEEL_STATES and _score(ctx, pruned)[0] >= thr / 2:
                out += _with_replicas(ctx, pruned, free)
        worse = worse + 1 if thr <= best * (1 + _EPS) else 0
        best = max(best, thr)
        if worse >= 2:
            break
    return out


def _repairs(ctx: _Context, frames: list[_Frame], free: list[NodeCapacity]) -> list[_State]:
    """Minimal repairs: every gap by its growing neighbours if they can, else by the fastest single free node."""
    out = []
    for neighbours_first in (True, False):
        members, pool = [], sorted(free, key=lambda n: (n.layer_ms, n.node_id))
        for frame in frames:
            gaps = []
            for gap in frame.gaps:
                chosen = _gap_pick(ctx, gap, pool, neighbours_first)
                pool = [n for n in pool if n not in chosen]
                gaps.append(chosen)
            members.append(tuple(gaps))
        out.append(_State(tuple(frames), tuple(members)))
    return out


def _gap_pick(ctx: _Context, gap: _Gap, pool: list[NodeCapacity], neighbours_first: bool) -> frozenset[NodeCapacity]:
    """Fewest free nodes (fastest first, then largest) that make ``gap`` fillable."""
    if neighbours_first and (gap.left or gap.right) and _fill_gap(ctx, gap, []) is not None:
        return frozenset()
    for node in pool:
        if _fill_gap(ctx, gap, [node]) is not None:
            return frozenset([node])
    chosen: list[NodeCapacity] = []
    for node in sorted(pool, key=lambda n: (-ctx.cap(n), n.layer_ms, n.node_id)):
        chosen.append(node)
        if _fill_gap(ctx, gap, ctx.order(frozenset(chosen))) is not None:
            return frozenset(chosen)
    return frozenset()


def _candidates(ctx: _Context, nodes: Sequence[NodeCapacity]) -> list[_State]:
    """Fresh plans around the fixed nodes, and with ``previous`` keep-and-repair plans."""
    auto = [n for n in nodes if n.fixed is None]
    fixed = _fixed_anchors(nodes)
    frames = [_frame(g, ctx.L) for g in _groups(fixed)]
    states = _family(ctx, frames, auto)
    if len(frames) > 1:  # conflicting fixed nodes: also plan around each group alone (fewer hops)
        for frame in frames:
            states += _family(ctx, [frame], auto)
    kept = _kept(ctx, auto)
    if kept:
        chains, rest = _chains(fixed + kept, ctx.L)
        chains, rest = _swap_twins(chains, rest)
        pieces, stray = _chains(rest, ctx.L, gaps=True)
        everything = _swap_tails(chains + pieces, ctx.model.hop_ms)
        chains = [c for c in everything if _complete(c, ctx.L)]
        pieces = [c for c in everything if not _complete(c, ctx.L)]
        in_chain = {a.node for chain in chains for a in chain}
        closed = [_frame(chain, ctx.L) for chain in chains]
        loose = [a for a in fixed if a.node not in in_chain]
        loose_frames = [_frame(g, ctx.L) for g in _groups(loose)]
        states += _family(ctx, closed + loose_frames, [n for n in auto if n not in in_chain])
        broken = [_frame(g, ctx.L) for g in pieces + _groups(stray)]
        anchored = {a.node for chain in everything for a in chain} | {a.node for a in stray}
        free = [n for n in auto if n not in anchored]
        for start in _repairs(ctx, closed + broken, free):
            states.append(start)
            states += _family_from(ctx, start, free)
    return states


def _family_from(ctx: _Context, start: _State, free: list[NodeCapacity]) -> list[_State]:
    """Local search from a repair, plus the repair with extra plain pipelines for the free nodes left."""
    improved = _local_search(ctx, start, free)
    return [improved, *_prune(ctx, improved), *_with_replicas(ctx, start, free)]


def _with_replicas(ctx: _Context, state: _State, free: list[NodeCapacity]) -> list[_State]:
    """The complete pipelines of ``state`` plus ``k = 1..K`` plain pipelines made of the free nodes they leave."""
    keep = [i for i, (f, m) in enumerate(zip(state.frames, state.members)) if ctx.build(f, m) is not None]
    frames, members = tuple(state.frames[i] for i in keep), tuple(state.members[i] for i in keep)
    placed = {n for gaps in members for nodes in gaps for n in nodes}
    spare = [n for n in free if n not in placed]
    plain, out = _frame([], ctx.L), []
    best = 0.0
    for k in range(1, _replicas_bound(ctx, spare) + 1):
        extra = _initial(ctx, [plain] * k, spare)
        out.append(_local_search(ctx, _State(frames + extra.frames, members + extra.members), spare))
        thr = _score(ctx, out[-1])[0]
        if thr <= best * (1 + _EPS):  # one more replica did not help: more will not either, usually
            break
        best = thr
    return out


def _cover(ctx: _Context, nodes: Sequence[NodeCapacity]) -> tuple[_State | None, int]:
    """Exact search for one complete chain (and the farthest layer a chain reaches) when heuristics found none."""
    fixed = [n for n in nodes if n.fixed is not None]
    auto = [n for n in nodes if n.fixed is None]
    seen: set[tuple[int, frozenset[str]]] = set()
    reach = 0

    def walk(pos: int, used: frozenset[str], path: tuple) -> tuple | None:
        nonlocal reach
        if pos == ctx.L:
            return path
        if (pos, used) in seen or len(seen) > _COVER_STATES:
            return None
        seen.add((pos, used))
        reach = max(reach, pos)
        for node in fixed:
            if node.node_id not in used and node.fixed[0] == pos and node.fixed[1] <= ctx.L:
                found = walk(node.fixed[1], used | {node.node_id}, path + ((node, pos, node.fixed[1]),))
                if found:
                    return found
        for node in auto:
            if node.node_id in used:
                continue
            if pos + ctx.cap(node, pos == 0, True) >= ctx.L:
                return path + ((node, pos, ctx.L),)
            cap = min(ctx.cap(node, pos == 0, False), ctx.L - pos - 1)  # not the last stage: stops before L - 1
            targets = {pos + cap} | {n.fixed[0] for n in fixed if pos < n.fixed[0] < pos + cap}
            for end in sorted(targets, reverse=True):
                if end > pos:
                    found = walk(end, used | {node.node_id}, path + ((node, pos, end),))
                    if found:
                        return found
        return None

    path = walk(0, frozenset(), ())
    if path is None:
        return None, reach
    anchors = [_Anchor(n, s, e, False) for n, s, e in path if n.fixed is not None]
    frame = _frame(anchors, ctx.L)
    members = tuple(frozenset(n for n, s, e in path if n.fixed is None and gap.start <= s < gap.end)
                    for gap in frame.gaps)
    return _State((frame,), (members,)), reach


def _to_plan(ctx: _Context, state: _State, nodes: Sequence[NodeCapacity]) -> Plan:
    pipelines, placed = [], set()
    for frame, members in zip(state.frames, state.members):
        built = ctx.build(frame, members)
        if built is not None:
            pipelines.append((built.throughput, tuple(Placement(n.node_id, s, e) for n, s, e in built.stages)))
            placed |= {n.node_id for n, _, _ in built.stages}
    pipelines.sort(key=lambda p: (-p[0], [x.node_id for x in p[1]]))
    left_out = [Placement(n.node_id, *n.fixed) for n in nodes if n.fixed is not None and n.node_id not in placed]
    partial = tuple(sorted(left_out, key=lambda p: (p.start, p.node_id)))
    idle = tuple(sorted(n.node_id for n in nodes if n.fixed is None and n.node_id not in placed))
    return Plan(tuple(p for _, p in pipelines), idle, sum(t for t, _ in pipelines), partial)


def _keeps(plan: Plan, kept: Sequence[_Anchor]) -> bool:
    """Every still-valid previous placement of an auto node is in a pipeline, unchanged."""
    now = {p.node_id: (p.start, p.end) for pipeline in plan.pipelines for p in pipeline}
    return all(now.get(a.node.node_id) == (a.start, a.end) for a in kept)


def _lexicographic(pool: Sequence[tuple[Plan, int]], tolerance: float) -> Plan:
    """Within ``tolerance`` of the pool's best throughput: fewest stages, fewest moves, fastest, node order."""
    top = max(plan.throughput for plan, _ in pool)
    near = [(plan, moved) for plan, moved in pool if plan.throughput >= (1 - tolerance) * top - _EPS * top]
    return min(near, key=lambda pm: (pm[0].stages, pm[1], -pm[0].throughput, sorted(pm[0].assignments().items())))[0]


def _choose(plans: Sequence[Plan], previous: Mapping[str, tuple[int, int]], kept: Sequence[_Anchor],
            tolerance: float) -> Plan:
    """The tolerance rule, with the plans that keep every previous placement as incumbents."""
    pool = [(plan, plan.moved_layers(previous) if previous else 0) for plan in plans]
    incumbents = [pm for pm in pool if _keeps(pm[0], kept)]
    if incumbents:
        best_incumbent = max(plan.throughput for plan, _ in incumbents)
        challengers = [pm for pm in pool if (1 - tolerance) * pm[0].throughput > best_incumbent * (1 + _EPS)]
        return _lexicographic(challengers or incumbents, tolerance)
    return _lexicographic(pool, tolerance)


def _check(model: ModelCost, nodes: Sequence[NodeCapacity], tolerance: float) -> None:
    ids = [n.node_id for n in nodes]
    if len(ids) != len(set(ids)):
        raise ValueError(f"duplicate node ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    for node in nodes:
        if node.fixed is not None and node.fixed[1] > model.num_layers:
            raise ValueError(f"fixed range {node.fixed[0]}:{node.fixed[1]} of {node.node_id} is beyond the model's "
                             f"{model.num_layers} layers")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")


def plan(model: ModelCost, nodes: Sequence[NodeCapacity], previous: Mapping[str, tuple[int, int]] | None = None,
         tolerance: float = 0.10) -> Plan:
    """Place every layer on the nodes (see the module docstring for the objective and the rules).

    Raises :class:`Unplaceable` when the nodes cannot serve all layers even once; otherwise the plan has
    at least one complete pipeline.
    """
    nodes = list(nodes)
    _check(model, nodes, tolerance)
    ctx = _Context(model, dict(previous or {}))
    states = _candidates(ctx, nodes) if nodes else []
    plans = [p for p in (_to_plan(ctx, s, nodes) for s in states) if p.pipelines]
    if not plans:
        state, reach = _cover(ctx, nodes)
        if state is None:
            covered = f"at most layers 0..{reach - 1}" if reach else "no layer"
            raise Unplaceable(f"cannot serve all {model.num_layers} layers even once: one pipeline of these nodes "
                              f"covers {covered} ({model.num_layers - reach} layers missing)")
        plans = [_to_plan(ctx, state, nodes)]
    kept = _kept(ctx, [n for n in nodes if n.fixed is None])
    return _choose(plans, ctx.previous, kept, tolerance)
