"""Choosing concrete replicas: the pure ``choose_route``, the layer-range graph it walks (checked against
brute force), the flags, and load routing over real NATS."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from parallax.broker import subjects
from parallax.broker.wire import SamplingParams, decode
from parallax.broker.registry import Load, NodeInfo
from parallax.scheduler.graph import disjoint_chains, min_cost_paths, reachable, shortest_chains
from parallax.scheduler.routing import RouteState, choose_route, find_chain, missing_ranges
from tests.cluster import Cluster, reference_greedy


def stage(node_id: str, start: int, end: int, layer_ms: float | None = 1.0, running: int = 0, waiting: int = 0,
          state: str = "serving") -> NodeInfo:
    return NodeInfo(node_id=node_id, model="m", start=start, end=end, num_layers=6, layer_ms=layer_ms, state=state,
                    load=Load(running=running, waiting=waiting))


def ids(route) -> list[str]:
    return [node_id for node_id, _, _ in route]


# --- load ----------------------------------------------------------------------------------------
def test_prefers_the_idle_replica():
    nodes = [stage("head", 0, 3), stage("a", 3, 6, running=4), stage("b", 3, 6, running=1)]
    assert choose_route(nodes, 6, "load", RouteState()) == [("head", 0, 3), ("b", 3, 6)]


def test_prefers_the_faster_replica_and_trades_speed_for_queue():
    fast, slow = stage("fast", 3, 6, layer_ms=1.0), stage("slow", 3, 6, layer_ms=4.0)
    assert ids(choose_route([stage("head", 0, 3), slow, fast], 6, "load")) == ["head", "fast"]
    busy = stage("fast", 3, 6, layer_ms=1.0, running=5)  # 3 * 1 * 6 = 18 ms > 3 * 4 * 1 = 12 ms
    assert ids(choose_route([stage("head", 0, 3), slow, busy], 6, "load")) == ["head", "slow"]


def test_unknown_speed_counts_at_the_median_of_the_known():
    nodes = [stage("head", 0, 3, layer_ms=2.0), stage("a", 3, 6, layer_ms=None), stage("b", 3, 6, layer_ms=3.0)]
    assert ids(choose_route(nodes, 6, "load")) == ["head", "a"]  # a counts at median(2, 3) = 2.5 < 3
    nodes[2] = stage("b", 3, 6, layer_ms=1.0)
    assert ids(choose_route(nodes, 6, "load")) == ["head", "b"]  # a counts at median(2, 1) = 1.5 > 1


def test_counts_requests_the_registry_does_not_show_yet():
    nodes = [stage("head", 0, 3), stage("a", 3, 6), stage("b", 3, 6)]
    state = RouteState()
    first = choose_route(nodes, 6, "load", state)
    assert ids(first) == ["head", "a"]  # equal cost: the smaller id
    state.acquire(first)
    second = choose_route(nodes, 6, "load", state)
    assert ids(second) == ["head", "b"]  # the registry still says a is idle; the local count does not
    state.acquire(second)
    state.acquire(choose_route(nodes, 6, "load", state))
    assert state.inflight == Counter({"head": 3, "a": 2, "b": 1})
    state.release(first)
    state.release(first)
    assert state.inflight == Counter({"head": 1, "b": 1})
    assert ids(choose_route(nodes, 6, "load", state)) == ["head", "a"]
    assert state.routed == Counter({"head": 3, "a": 2, "b": 1})


def test_the_larger_of_registry_and_local_load_counts():
    nodes = [stage("head", 0, 3), stage("a", 3, 6, running=3), stage("b", 3, 6, running=1, waiting=1)]
    state = RouteState()
    state.inflight.update({"b": 4})  # b: max(2, 4) = 4 > a: max(3, 0) = 3
    assert ids(choose_route(nodes, 6, "load", state)) == ["head", "a"]
    state.inflight["b"] = 1  # b: max(2, 1) = 2 < 3
    assert ids(choose_route(nodes, 6, "load", state)) == ["head", "b"]


def test_a_slow_replica_gets_work_only_when_the_fast_one_is_busy():
    nodes = [stage("head", 0, 3, layer_ms=1.0), stage("a", 3, 6, layer_ms=10.0), stage("b", 3, 6, layer_ms=1.0)]
    state = RouteState()
    picks = []
    for _ in range(12):
        route = choose_route(nodes, 6, "load", state)
        state.acquire(route)
        picks.append(route[1][0])
    assert picks[:9] == ["b"] * 9  # a: 30 ms; b: 3 * (1 + q) ms, below 30 until q = 9
    assert "a" in picks[9:]


def test_fewest_hops_among_equal_costs():
    nodes = [stage("x", 0, 3), stage("y", 3, 6), stage("whole", 0, 6)]
    assert choose_route(nodes, 6, "load", hop_ms=0.0) == [("whole", 0, 6)]
    assert choose_route(nodes, 6, "load") == [("whole", 0, 6)]  # with a hop cost, even more so
    faster = [stage("x", 0, 3, layer_ms=0.5), stage("y", 3, 6, layer_ms=0.5), stage("whole", 0, 6)]
    assert ids(choose_route(faster, 6, "load")) == ["x", "y"]  # 2 * (1.5 + 1) = 5 < 6 + 1


def test_no_complete_chain_is_none():
    assert choose_route([], 6, "load") is None
    assert choose_route([stage("a", 0, 3), stage("b", 4, 6)], 6, "load") is None
    assert choose_route([stage("a", 0, 3), stage("b", 4, 6)], 6, "round-robin", RouteState()) is None
    leaving = [stage("a", 0, 3), stage("b", 3, 6, state="loading")]
    assert choose_route(leaving, 6, "load") is None
    assert choose_route(leaving, 6, "round-robin") is None
    with pytest.raises(ValueError, match="unknown routing policy 'random'"):
        choose_route(leaving, 6, "random")  # type: ignore[arg-type]


def test_range_helpers_still_work():
    assert find_chain([(0, 3), (3, 6), (0, 6)], 6) == [(0, 6)]
    assert missing_ranges([(0, 3)], 6) == [(3, 6)]


# --- the layer-range graph (boundaries 0..L, a range a:b is an edge a -> b) ------------------------
def test_shortest_chains_are_listed_in_lexicographic_order():
    ranges = [(3, 6), (0, 3), (2, 4), (4, 6), (0, 2), (2, 6), (0, 2)]
    assert list(shortest_chains(ranges, 6)) == [[(0, 2), (2, 6)], [(0, 3), (3, 6)]]  # not 0:2, 2:4, 4:6
    assert find_chain(ranges, 6) == [(0, 2), (2, 6)]
    assert list(shortest_chains([(0, 2), (3, 6)], 6)) == [] and find_chain([(0, 2), (3, 6)], 6) is None


def test_reachable_and_missing():
    assert reachable([(0, 3), (3, 5), (7, 9), (5, 5)]) == {0, 3, 5}
    assert missing_ranges([(0, 3), (3, 5), (3, 9)], 9) == []
    assert missing_ranges([(0, 3), (4, 9)], 9) == [(3, 4)]  # a layer nobody holds
    assert missing_ranges([(0, 4), (3, 9)], 9) == [(4, 9)]  # all held, but the chains do not join


def test_min_cost_paths_and_its_bounds():
    edges = [(0, 4, -5, 1), (4, 9, -5, 1), (0, 9, -1, 2), (0, 4, 3, 1)]  # (from, to, cost, capacity)
    assert min_cost_paths(edges, 9) == [[0, 1], [2], [2]]  # every path of negative cost, cheapest first
    assert disjoint_chains([(0, 4), (4, 9), (0, 9), (0, 4)], 9) == 2
    # the first chain found (0:2 2:3 3:4 4:6) must give way to two: 0:4 4:6 and 0:2 2:6
    assert disjoint_chains([(0, 2), (2, 3), (3, 4), (4, 6), (0, 4), (2, 6)], 6) == 2
    with pytest.raises(ValueError):
        disjoint_chains([(0, 1)], 0)


def _all_chains(ranges: list[tuple[int, int]], end: int) -> list[list[tuple[int, int]]]:
    """Every chain of distinct ranges from 0 to ``end``, by exhaustive search."""
    out = []

    def walk(pos: int, path: list[tuple[int, int]]) -> None:
        if pos == end:
            out.append(list(path))
        for r in sorted(set(ranges)):
            if r[0] == pos and r not in path:
                walk(r[1], path + [r])

    walk(0, [])
    return out


def _most_disjoint(ranges: list[tuple[int, int]], end: int) -> int:
    """The most chains from 0 to ``end`` that use every range (each copy of it) at most once, by exhaustive search."""
    best = 0
    for chain in _all_chains(ranges, end):
        rest = list(ranges)
        for r in chain:
            rest.remove(r)
        best = max(best, 1 + _most_disjoint(rest, end))
    return best


def _ranges_within(end: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    one = st.integers(0, end - 1).flatmap(lambda a: st.tuples(st.just(a), st.integers(a + 1, end)))
    return st.lists(one, max_size=7)


small_ranges = st.integers(1, 6).flatmap(lambda end: st.tuples(_ranges_within(end), st.just(end)))


@given(small_ranges)
def test_the_graph_walks_agree_with_brute_force(case):
    ranges, end = case
    chains = _all_chains(ranges, end)
    fewest = min(map(len, chains), default=None)
    assert list(shortest_chains(ranges, end)) == sorted(c for c in chains if len(c) == fewest)
    assert reachable(ranges) == {b for b in range(end + 1) if _all_chains(ranges, b)}
    assert disjoint_chains(ranges, end) == _most_disjoint(ranges, end)
    missing = missing_ranges(ranges, end)
    held = {i for a, b in ranges for i in range(a, b)}
    event("a chain" if chains else "all held, no chain" if set(range(end)) <= held else "layers missing")
    if chains:
        assert missing == []
    elif set(range(end)) <= held:  # all held: the gap after the farthest boundary a chain reaches
        assert missing == [(max(b for b in reachable(ranges) if b < end), end)]
    else:
        assert [i for a, b in missing for i in range(a, b)] == sorted(set(range(end)) - held)


# --- round-robin ---------------------------------------------------------------------------------
def test_round_robin_alternates_replicas_whatever_their_load():
    nodes = [stage("head", 0, 3), stage("b", 3, 6, running=9), stage("a", 3, 6)]
    state = RouteState()
    picks = [ids(choose_route(nodes, 6, "round-robin", state))[1] for _ in range(5)]
    assert picks == ["a", "b", "a", "b", "a"]
    assert state.turn == 5


def test_round_robin_visits_every_combination_of_replicas():
    nodes = [stage("h1", 0, 3), stage("h2", 0, 3), stage("t1", 3, 6), stage("t2", 3, 6)]
    state = RouteState()
    routes = [tuple(ids(choose_route(nodes, 6, "round-robin", state))) for _ in range(8)]
    assert routes[:4] == [("h1", "t1"), ("h1", "t2"), ("h2", "t1"), ("h2", "t2")]
    assert routes[4:] == routes[:4]


def test_round_robin_uses_the_chains_with_fewest_hops():
    nodes = [stage("x", 0, 3), stage("y", 3, 6), stage("w1", 0, 6), stage("w2", 0, 6)]
    state = RouteState()
    assert [ids(choose_route(nodes, 6, "round-robin", state)) for _ in range(3)] == [["w1"], ["w2"], ["w1"]]


# --- flags ---------------------------------------------------------------------------------------
def test_flags():
    from parallax.gateway.cli import parse_args as gateway_args
    from parallax.gateway.nats_pipeline import PipelineConfig
    from parallax.stages.cli import parse_args as stage_args
    from parallax.stages.cli import worker_config

    assert gateway_args(["--model", "m"]).routing == "load"
    assert gateway_args(["--model", "m", "--routing", "round-robin"]).routing == "round-robin"
    with pytest.raises(SystemExit, match="^2$"):  # argparse: usage error
        gateway_args(["--model", "m", "--routing", "random"])
    with pytest.raises(ValueError, match="routing must be one of load, round-robin, got 'random'"):
        PipelineConfig(model="m", num_layers=6, routing="random")  # type: ignore[arg-type]
    assert worker_config(stage_args(["--model", "m", "--layers", "0:3"])).debug_delay_ms == 0.0
    args = stage_args(["--model", "m", "--layers", "0:3", "--debug-delay-ms", "60", "--node-id", "n1"])
    assert worker_config(args).debug_delay_ms == 60.0 and worker_config(args).node_id == "n1"


# --- over NATS -----------------------------------------------------------------------------------
LAYERS = 6
PROMPTS = [[(i * 31 + j * 7) % 500 + 3 for j in range(4 + 3 * i)] for i in range(12)]
NEW_TOKENS = 12


async def watch_first_messages(nc, ranges: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """Request id -> the nodes whose own subject carried its first message (the one with meta)."""
    served: dict[str, list[str]] = {}

    def spy(node_id: str):
        async def seen(msg) -> None:
            header, _ = decode(msg.data)
            for item in header.items:
                if item.meta is not None:
                    served.setdefault(item.rid, []).append(node_id)
        return seen

    for node_id, (a, b) in ranges.items():
        await nc.subscribe(subjects.node("tiny", a, b, node_id), cb=spy(node_id))
    await nc.flush()
    return served


@pytest.mark.slow  # tiny_model_dir: needs the SmolLM2 conversion (its tokenizer)
async def test_load_routing_sends_most_work_to_the_fast_replica(nats_url, tiny_model_dir):
    references = [reference_greedy(tiny_model_dir, p, NEW_TOKENS) for p in PROMPTS]
    c = Cluster(nats_url, tiny_model_dir, "tiny", LAYERS)
    try:
        await c.add_stage(0, 3, node_id="head")
        await c.add_stage(3, 6, node_id="a-slow", debug_delay_ms=80)  # wins ties on its id: a fair test
        await c.add_stage(3, 6, node_id="b-fast")
        pipeline = await c.connect()
        assert pipeline.config.routing == "load"
        served = await watch_first_messages(c.nc, {"head": (0, 3), "a-slow": (3, 6), "b-fast": (3, 6)})

        async def generate(prompt: list[int]) -> tuple[list[int], tuple[str, ...]]:
            rid = uuid.uuid4().hex
            events = [e async for e in pipeline.generate(rid, prompt, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))]
            return [e.token for e in events], tuple(served[rid])  # the nodes that really got it, in hop order

        # warm-up: 4 at once split 2/2 (nothing measured yet); then both replicas have measured their speed
        warm = await asyncio.gather(*(generate(p) for p in PROMPTS[:4]))
        assert Counter(route[1] for _, route in warm) == Counter({"a-slow": 2, "b-fast": 2})
        await asyncio.sleep(0.6)  # a few heartbeats: the registry now has each replica's measured speed
        speed = {n.node_id: n.layer_ms for n in pipeline.registry.serving("tiny")}
        assert speed["a-slow"] > speed["b-fast"]

        before = Counter(pipeline.routes.routed)
        results = await asyncio.gather(*(generate(p) for p in PROMPTS[4:]))
        routed = Counter(pipeline.routes.routed) - before
        seen = Counter(route[1] for _, route in results)
        assert seen == Counter({k: v for k, v in routed.items() if k != "head"})  # the stages went where pinned
        assert all(route[0] == "head" for _, route in warm + results)
        assert seen["b-fast"] >= 6, seen
        assert [tokens for tokens, _ in warm + results] == references
        assert pipeline.routes.inflight == Counter()
        assert await c.settled()
    finally:
        await c.close()
