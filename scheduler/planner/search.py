"""Spreading free nodes over pipelines: greedy start, steepest-ascent local search, pruning."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from parallax.scheduler.planner.fill import _Context, _Frame
from parallax.scheduler.planner.types import _EPS, NodeCapacity

_STEPS_PER_NODE = 4  # local-search steps per free node, at most

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
    for node in sorted(free, key=lambda n: (-ctx.best_cap(n), n.layer_ms, n.node_id)):
        if not slots or ctx.best_cap(node) == 0:
            continue
        need = max(slots, key=lambda s: (room[s], -s[0], -s[1]))
        if room[need] <= 0:
            size = {s: frames[s[0]].gaps[s[1]].end - frames[s[0]].gaps[s[1]].start for s in slots}
            need = max(slots, key=lambda s: (size[s] / speed[s] if speed[s] else float("inf"), -s[0], -s[1]))
        members[need[0]][need[1]].add(node)
        room[need] -= ctx.best_cap(node)
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
