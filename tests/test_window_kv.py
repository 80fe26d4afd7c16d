"""The KV cache keeps only the window for sliding-window layers: a stage's layers form KV groups (full
attention, each window), each with its own pool and block manager; a request gives a window group's blocks
back as soon as no later row of it reads them. Tiny Mistral (every layer slides, window 8, blocks of 4),
gpt-oss (alternating) and a fused bf16 Qwen2 (full, then sliding) generate past the window with freed blocks
overwritten by garbage, equal to transformers' float32 logits and greedy tokens; the window group holds at
most the window's blocks; every count goes back to 0 on release; admission admits a request whose whole KV
does not fit the pool but whose window does; the budget is split by the groups' needs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parallax.broker.wire import Forward, ForwardItem, RequestMeta, SamplingParams, Tokens, decode, encode
from parallax.stages.blocks import NULL_BLOCK, KVGroup, KVSpace, kv_groups, split_blocks, window_blocks
from parallax.stages.engine import Engine, EngineConfig
from parallax.stages.kv import GroupedKV, KVPool, Rows
from parallax.stages.torch_backend import TorchBackend, load_stage_model
from tests.cluster import reference_greedy
from tests.test_gpt_oss import make_gpt_oss, make_windowed
from tests.test_moe import assert_as_close_as_transformers_to_itself

CPU, BS = torch.device("cpu"), 4
IDS = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(3))  # 30 positions: several windows


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("window-kv")
    torch.manual_seed(0)
    config = AutoConfig.for_model("mistral", num_hidden_layers=3, vocab_size=512, hidden_size=64, intermediate_size=96,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                  initializer_range=0.3, sliding_window=8)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(root / "mistral")
    make_gpt_oss(root / "gpt_oss")  # sliding (window 5), full, sliding, full
    make_windowed(root / "qwen2", "qwen2", use_sliding_window=True, max_window_layers=1)  # full, sliding (5), sliding
    AutoModelForCausalLM.from_pretrained(root / "qwen2", dtype=torch.bfloat16).save_pretrained(root / "qwen2-bf16")
    return {name: root / name for name in ("mistral", "gpt_oss", "qwen2-bf16")}


def load(path: Path, start: int, end: int):
    return load_stage_model(path, json.loads((path / "config.json").read_text()), start, end, torch.float32, CPU)


# --- bookkeeping -------------------------------------------------------------------------------------------


def test_layers_group_by_window_full_first():
    assert kv_groups([5, None, 5, None]) == (KVGroup(None, (1, 3)), KVGroup(5, (0, 2)))
    assert kv_groups([8, 8, 8]) == (KVGroup(8, (0, 1, 2)),)
    assert kv_groups([None, 128, 4]) == (KVGroup(None, (0,)), KVGroup(4, (2,)), KVGroup(128, (1,)))


def test_the_budget_goes_where_it_is_needed():
    full, window = KVGroup(None, (1, 3)), KVGroup(5, (0, 2))
    assert split_blocks([KVGroup(8, (0, 1, 2))], 50, BS, 256, 512) == (50,)  # one group: the whole budget
    assert split_blocks([full, window], 100, BS, 256, 512) == (100, 100)  # the window group needs all of it
    # one request, steps of 8 rows: the window group needs 1 * (3 + 1) + 2 = 6; its other 94 blocks of 2 layers
    # are 94 blocks of the full group's 2 layers
    assert window_blocks(5, 1, BS) == 3
    assert split_blocks([full, window], 100, BS, 1, 8) == (194, 6)


def test_a_window_group_gives_back_what_no_row_reads():
    space = KVSpace([KVGroup(None, (0,)), KVGroup(8, (1,))], [20, 5], BS)
    prompt = list(range(30))
    t = space.allocate(30, space.no_prefix, 4)  # the full group: all 8 blocks; the window group: the first chunk
    assert [len(x) for x in t.tables] == [8, 1] and space.managers[1].used == 1
    registered, peak = 0, 0
    for pos, n in [(0, 4), (4, 4), (8, 4), (12, 4), (16, 4), (20, 4), (24, 4), (28, 2)] + [(p, 1) for p in range(30, 41)]:
        space.grow(t, pos + n)
        peak = max(peak, space.managers[1].used)
        registered = space.computed(t, prompt, registered, pos + n)
        keep = max(0, pos + n - 8 + 1) // BS  # the first block the next row reads (its window: 8 keys, its own included)
        assert t.freed[1] == keep and t.tables[1][:keep] == [NULL_BLOCK] * keep and space.managers[1].used <= 3
    assert peak <= window_blocks(8, 4, BS) == 4 and t.freed[0] == 0 and len(t.tables[0]) == 11
    space.release(t)
    assert space.used == 0 and [m.used for m in space.managers] == [0, 0]


def test_admission_counts_the_window_not_the_whole_request():
    """A pool of 5 blocks (20 positions) cannot hold a prompt of 30 at full attention; with a window of 8 a
    request holds at most 4 blocks at once (chunks of 4): it fits."""
    full = KVSpace([KVGroup(None, (0, 1))], [5], BS)
    windowed = KVSpace([KVGroup(8, (0, 1))], [5], BS)
    assert not full.can_allocate(30, full.no_prefix, 4)
    assert windowed.can_allocate(30, windowed.no_prefix, 4)
    assert not windowed.can_allocate(30, windowed.no_prefix, 16)  # chunks of 16: 23 keys span 7 blocks


def test_a_window_groups_prefix_needs_only_the_window():
    """A cached prefix of k blocks serves a new request when the full group still holds all k and the window
    group the blocks the first row after it reads; the window group's earlier blocks may be gone."""
    space = KVSpace([KVGroup(None, (0,)), KVGroup(6, (1,))], [20, 20], BS)
    prompt = list(range(100, 125))  # 25 tokens: 6 full blocks
    t = space.allocate(25, space.no_prefix, 25)
    space.computed(t, prompt, 0, 25)  # gives back the window group's blocks before position 20
    assert t.freed == [0, 5]
    hit = space.cached_prefix(prompt, 24)
    # 6 blocks (24 tokens): the row at 24 reads 19..24: blocks 4 and 5 of the window group. Block 4 was given
    # back but is still cached (nobody took it), so the hit holds
    assert hit.tokens == 24 and hit.skip == (0, 4) and hit.reuse[0] == tuple(t.tables[0][:6])
    space.release(t)
    for _ in range(15):  # another request takes the free blocks in LRU order: block 4 of the window group goes
        space.managers[1].allocate(1)
    hit = space.cached_prefix(prompt, 24)
    assert hit.tokens < 24 and all(b is not None for b in hit.reuse[1])
    got = space.allocate(25, hit, 4)
    assert got.tables[1][: hit.skip[1]] == [NULL_BLOCK] * hit.skip[1]
    space.release(got)
    assert space.managers[0].used == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "step", "free"]), st.integers(1, 12), st.integers(0, 2)), max_size=50))
def test_refcounts_hold_in_every_group(ops):
    """Requests admitted (sharing cached prefixes), stepped (grown, their window blocks given back) and released
    in any order: each group's reference counts are its tables' live entries, its free list the rest."""
    space = KVSpace([KVGroup(None, (0,)), KVGroup(6, (1,))], [40, 12], BS)
    prompts = [[p] * 30 + list(range(20)) for p in range(3)]
    live: list[tuple[object, list[int], int]] = []
    for op, n, p in ops:
        if op == "admit":
            prefix = space.cached_prefix(prompts[p], 29)
            if space.can_allocate(30, prefix, 4):
                t = space.allocate(30, prefix, 4)
                live.append((t, prompts[p], prefix.tokens))
        elif op == "step" and live:
            t, prompt, length = live[p % len(live)]
            if space.can_grow(t, length + n):
                space.grow(t, length + n)
                space.computed(t, prompt, 0, length + n)
                live[p % len(live)] = (t, prompt, length + n)
        elif op == "free" and live:
            space.release(live.pop(0)[0])
        for g, m in enumerate(space.managers):
            owners = [b for t, _, _ in live for b in t.tables[g][t.freed[g]:]]
            assert all(m.ref[b] == owners.count(b) for b in range(m.num_blocks))
            assert set(m.free) == {b for b in range(m.num_blocks) if m.ref[b] == 0}
        assert all(len(t.tables[1]) - t.freed[1] <= window_blocks(6, 12, BS) for t, _, _ in live)
    for t, _, _ in live:
        space.release(t)
    assert space.used == 0


# --- the model reads its group's table for each layer ---------------------------------------------------------


def trimmed_logits(stages, ids: torch.Tensor, prompt: int, chunk: int) -> tuple[torch.Tensor, list[int]]:
    """Every position's logits, each stage keeping its KV as an engine does (``KVSpace`` over ``kv_groups``, the
    prompt in chunks of ``chunk``, then one token a step), a window group's pool as small as a request may need
    (its blocks are reused as the window slides) and each of its free blocks overwritten with garbage after every
    step (a row that read one would change). Also each stage's most window-group blocks held."""
    g = torch.Generator().manual_seed(0)
    spaces, caches, tables = [], [], []
    for stage in stages:
        groups = kv_groups([layer.self_attn.window for layer in stage.layers])
        sizes = [-(-len(ids) // BS) if grp.window is None else window_blocks(grp.window, chunk, BS) for grp in groups]
        spaces.append(KVSpace(groups, sizes, BS))
        caches.append(GroupedKV([grp.layers for grp in groups], sizes, *stage.args.kv_dims[:2], BS, torch.float32, CPU))
        tables.append(spaces[-1].allocate(len(ids), spaces[-1].no_prefix, chunk))
    steps = [(p, min(chunk, prompt - p)) for p in range(0, prompt, chunk)] + [(p, 1) for p in range(prompt, len(ids))]
    out, peak = [], [0] * len(stages)
    with torch.inference_mode():
        for pos, n in steps:
            x = ids[pos : pos + n]
            for s, (stage, space, cache, t) in enumerate(zip(stages, spaces, caches, tables)):
                space.grow(t, pos + n)
                peak[s] = max([peak[s]] + [m.used for m, grp in zip(space.managers, space.groups) if grp.window])
                rows = Rows.build([(t.tables[0], pos, n, True)], BS, CPU, more=[t.tables[1:]])
                rows.sample_rows = torch.arange(n)
                x = stage(x, rows, cache)
                space.computed(t, ids.tolist(), 0, pos + n)
                for k, (m, grp) in enumerate(zip(space.managers, space.groups)):
                    for b in m.free if grp.window else ():
                        for pool in (cache.pools[k].k, cache.pools[k].v):
                            pool[:, b * BS : (b + 1) * BS] = torch.randn(pool[:, :BS].shape, generator=g) * 100
            out.append(x)
    assert all(t.freed[-1] > 0 for t in tables)  # every stage gave window blocks back
    return torch.cat(out), peak


@pytest.mark.parametrize("name, split", [("mistral", [(0, 3)]), ("gpt_oss", [(0, 1), (1, 4)])])
def test_past_the_window_with_freed_blocks_equals_transformers(models, name, split):
    from transformers import AutoModelForCausalLM

    stages = [load(models[name], a, b) for a, b in split]
    got, peak = trimmed_logits(stages, IDS, 13, 4)
    window = stages[0].layers[0].self_attn.window
    assert max(peak) <= window_blocks(window, 4, BS) < len(IDS) // BS
    model = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32).eval()
    assert_as_close_as_transformers_to_itself(got, model, IDS, 13)


def test_the_fused_path_reads_each_layers_group(models):
    """bf16 weights, float32 activations (the numba kernels): a full layer and two sliding ones in two groups,
    window blocks given back and overwritten, equal the same stage on one pool that keeps everything."""
    stage = load(models["qwen2-bf16"], 0, 3)
    assert stage.fused and [layer.self_attn.window for layer in stage.layers] == [None, 5, 5]
    got, _ = trimmed_logits([stage], IDS, 13, 4)
    pool = KVPool(3, *stage.args.kv_dims[:2], 8, BS, torch.float32, CPU)
    table, want = list(range(8)), []
    with torch.inference_mode():
        for pos, n in [(0, 4), (4, 4), (8, 4), (12, 1)] + [(p, 1) for p in range(13, 30)]:
            rows = Rows.build([(table, pos, n, True)], BS, CPU)
            rows.sample_rows = torch.arange(n)
            want.append(stage(IDS[pos : pos + n], rows, pool))
    assert torch.equal(got, torch.cat(want))


# --- the engine ---------------------------------------------------------------------------------------------------


def generate(engine: Engine, prompt: list[int], new: int) -> tuple[list[int], list[list[int]]]:
    """A one-stage chain's greedy tokens, and each group's blocks in use after every step."""
    layers = engine.spec.num_layers
    meta = RequestMeta(reply="gw.reply", chain=((0, layers),), route=("solo",), prompt_ids=tuple(prompt),
                       sampling=SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    header = Forward(items=(ForwardItem(rid="r", pos=0, n=len(prompt), meta=meta),), dtype="int32", shape=(len(prompt),))
    engine.submit(*decode(encode(header, np.asarray(prompt, "<i4").tobytes())))
    tokens, used = [], []
    while engine.has_work():
        for subject, payload in engine.step():
            header, _ = decode(payload)
            assert subject != "gw.reply" or isinstance(header, Tokens), header
            if isinstance(header, Tokens):
                tokens += [t.token for t in header.items]
        used.append([m.used for m in engine.blocks.managers])
    return tokens, used


def test_a_stage_whose_window_fits_serves_past_its_pool(models):
    """Mistral, every layer sliding (window 8): a pool of 6 blocks (24 positions) serves a prompt of 13 and
    20 new tokens (33 positions), its blocks reused as the window slides, the tokens transformers' own."""
    backend = TorchBackend.load(models["mistral"], "m", 0, 3, "float32", "cpu")
    engine = Engine(backend, "solo", EngineConfig(kv_blocks=6, block_size=BS, chunk_tokens=4, max_tokens_per_step=8))
    prompt = IDS[:13].tolist()
    tokens, used = generate(engine, prompt, 20)
    assert tokens == reference_greedy(models["mistral"], prompt, 20)
    assert max(u[0] for u in used) <= window_blocks(8, 4, BS) and used[-1] == [0] and engine.blocks.used == 0


def test_a_stage_of_full_and_sliding_layers(models):
    """gpt-oss (sliding, full, sliding, full): two groups, the budget split by their needs; the full group
    keeps every position, the window group at most the window's blocks; all given back at the end."""
    backend = TorchBackend.load(models["gpt_oss"], "g", 0, 4, "float32", "cpu")
    config = EngineConfig(kv_blocks=12, block_size=BS, chunk_tokens=4, max_tokens_per_step=8, max_batch_size=1)
    engine = Engine(backend, "solo", config)
    assert [m.num_blocks for m in engine.blocks.managers] == [18, 6]
    assert [p.k.shape[:2] for p in backend.kv.pools] == [(2, 18 * BS), (2, 6 * BS)]
    prompt = IDS[:13].tolist()
    tokens, used = generate(engine, prompt, 16)
    assert tokens == reference_greedy(models["gpt_oss"], prompt, 16)
    assert max(u[0] for u in used) == 7  # the 28 positions computed (the last token's never is)
    assert max(u[1] for u in used) <= window_blocks(5, 4, BS) and used[-1] == [0, 0]


# --- what the planner is told ---------------------------------------------------------------------------------


def test_the_profile_reports_each_layers_window_and_the_planner_reserves_it(models):
    from parallax.broker.registry import ModelProfile
    from parallax.scheduler.planner import ModelCost
    from parallax.stages.profile import model_profile

    profile = model_profile(models["gpt_oss"], "float32")
    per_token = profile.kv_bytes_per_token
    assert profile.kv_windows == (5, 0, 5, 0) and per_token == 2 * 2 * 16 * 4  # keys + values, 2 heads of 16
    assert profile.kv_reserve(4096) == (5 * per_token, 4096 * per_token) * 2
    assert model_profile(models["mistral"], "float32").kv_windows == (8, 8, 8)
    assert model_profile(models["qwen2-bf16"], "float32").kv_windows == (0, 5, 5)
    full = ModelProfile(num_layers=2, layer_bytes=1, first_bytes=0, last_bytes=0, kv_bytes_per_token=3)
    assert full.kv_windows is None and full.kv_reserve(10) == (30, 30)  # full attention (or an older record)
    cost = ModelCost(num_layers=4, layer_bytes=max(profile.per_layer), kv_reserve_bytes=4096 * per_token,
                     layer_bytes_list=profile.layer_bytes_list, kv_reserve_list=profile.kv_reserve(4096))
    assert cost.layer_costs == tuple(w + kv for w, kv in zip(profile.per_layer, profile.kv_reserve(4096)))
    assert cost.layer_costs[0] < cost.layer_costs[1]
