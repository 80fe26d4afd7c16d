"""Candidate plans (fresh, around fixed nodes, keep-and-repair) and the tolerance rule that picks one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from parallax.broker.errors import Unplaceable
from parallax.scheduler.planner.fill import _Anchor, _Context, _fill_gap, _Frame, _frame, _Gap
from parallax.scheduler.planner.incumbents import _chains, _complete, _groups, _kept, _swap_tails, _swap_twins
from parallax.scheduler.planner.search import _initial, _local_search, _prune, _score, _State
from parallax.scheduler.planner.types import _EPS, ModelCost, NodeCapacity, Placement, Plan

_PEEL_STATES = 12  # pruned states of the first k that also get replicas of the nodes they free
_COVER_STATES = 200_000  # budget of the exact search used only when the heuristics place nothing


def _fixed_anchors(nodes: Sequence[NodeCapacity]) -> list[_Anchor]:
    return [_Anchor(n, n.fixed[0], n.fixed[1], False) for n in nodes if n.fixed is not None]


def _replicas_bound(ctx: _Context, free: Sequence[NodeCapacity]) -> int:
    """How many plain pipelines the free nodes' memory could hold at most."""
    return min(len(free), sum(ctx.best_cap(n) for n in free) // ctx.L)


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
    """Minimal repairs: every gap by its growing neighbours if they can, else by the fastest single free node;
    and by free nodes alone, every anchor left exactly as it is (an incumbent even where growing a
    neighbour would be as fast)."""
    held = [_frame([replace(a, extendable=False) for a in frame.anchors], ctx.L) for frame in frames]
    return [_fill_gaps(ctx, frames, free, True), _fill_gaps(ctx, frames, free, False),
            _fill_gaps(ctx, held, free, False)]


def _fill_gaps(ctx: _Context, frames: list[_Frame], free: list[NodeCapacity], neighbours_first: bool) -> _State:
    """Each gap in turn gets the fewest free nodes that fill it (:func:`_gap_pick`), fastest first."""
    members, pool = [], sorted(free, key=lambda n: (n.layer_ms, n.node_id))
    for frame in frames:
        gaps = []
        for gap in frame.gaps:
            chosen = _gap_pick(ctx, gap, pool, neighbours_first)
            pool = [n for n in pool if n not in chosen]
            gaps.append(chosen)
        members.append(tuple(gaps))
    return _State(tuple(frames), tuple(members))


def _repaired(ctx: _Context, state: _State) -> _State:
    """The complete pipelines of ``state``, every range held as it is, re-paired at shared boundaries where
    that is faster (a departed node's gap filled in one chain may suit a faster neighbour in another)."""
    built = [ctx.build(f, m) for f, m in zip(state.frames, state.members)]
    chains = [[_Anchor(node, start, end, False) for node, start, end in b.stages] for b in built if b is not None]
    frames = tuple(_frame(chain, ctx.L) for chain in _swap_tails(chains, ctx.model.hop_ms))
    return _State(frames, tuple(() for _ in frames))


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
            states += [start, _repaired(ctx, start), *_family_from(ctx, start, free)]
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
