"""Mixture-of-experts architectures (qwen3_moe, mixtral) on tiny random configs: float32 logits and greedy
tokens equal transformers' through 1-, 2- and 3-stage splits (splits falling between dense and sparse
layers), a step runs only the experts its rows picked, a bf16 row's result depends on its request only,
the profile reports every layer at its own size, and the planner and ``parallax status`` use those sizes."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from parallax.broker.errors import Unplaceable, UnsupportedModel
from parallax.broker.layers import even_split
from parallax.broker.registry import ModelProfile, NodeInfo
from parallax.scheduler.planner import ModelCost, NodeCapacity, max_layers, plan
from parallax.stages.kv import KVPool, Rows
from parallax.stages.models import architecture
from parallax.stages.models.moe import MoEStageModel, SparseMoE
from parallax.stages.torch_backend import TorchBackend, load_stage_model
from tests.cluster import RowSteps, reference_greedy

CPU = torch.device("cpu")
VOCAB = 512
COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.3,
              max_position_embeddings=4096, num_experts_per_tok=2)
CONFIGS = {  # name -> (model_type, layers, config arguments)
    # dense layers 0 and 3 (mlp_only_layers), experts in 1, 2, 4
    "qwen3_moe": ("qwen3_moe", 5, dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                       norm_topk_prob=True, mlp_only_layers=[0, 3])),
    # decoder_sparse_step 2: experts in layers 1 and 3; top-k probabilities not renormalised
    "qwen3_moe_step2": ("qwen3_moe", 4, dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                             norm_topk_prob=False, decoder_sparse_step=2)),
    "mixtral": ("mixtral", 4, dict(intermediate_size=48, num_local_experts=6)),
}
SPARSE = {"qwen3_moe": [False, True, True, False, True], "qwen3_moe_step2": [False, True, False, True],
          "mixtral": [True] * 4}
SPLITS = {  # name -> splits into 1, 2 and 3 stages; each cut between a dense and a sparse layer where there are both
    "qwen3_moe": [[(0, 5)], [(0, 3), (3, 5)], [(0, 1), (1, 3), (3, 5)]],
    "qwen3_moe_step2": [[(0, 4)], [(0, 2), (2, 4)], [(0, 1), (1, 2), (2, 4)]],
    "mixtral": [even_split(4, n) for n in (1, 2, 3)],
}


def make_moe(path: Path, name: str, vocab: int = VOCAB) -> Path:
    """A random MoE saved as a float32 HF folder; routers scaled up so that no row's top k is a near-tie."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, layers, extra = CONFIGS[name]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, num_hidden_layers=layers, vocab_size=vocab, **COMMON, **extra)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.mul_(4)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {name: make_moe(root / name, name) for name in CONFIGS}


def load(path: Path, start: int, end: int, dtype=torch.float32, quantize=None):
    return load_stage_model(path, json.loads((path / "config.json").read_text()), start, end, dtype, CPU, quantize)


@torch.inference_mode()
def run_stages(stages, pools, x, pos, all_logits=True):
    n, table = x.shape[0], [5, 2, 7, 0, 3, 1]  # any blocks, in any order: 6 blocks of 4 rows
    for stage, pool in zip(stages, pools):
        rows = Rows.build([(table, pos, n, True)], 4, CPU)
        if all_logits:
            rows.sample_rows = torch.arange(n)
        x = stage(x, rows, pool)
    return x


def greedy_through(stages, prompt: list[int], new: int) -> list[int]:
    """Greedy tokens through the stage models in order: the prompt in one step, then one token a step."""
    caches, got = pools(stages), []
    logits = run_stages(stages, caches, torch.tensor(prompt), 0, all_logits=False)
    for pos in range(len(prompt), len(prompt) + new):
        got.append(int(logits[-1].argmax()))
        logits = run_stages(stages, caches, torch.tensor(got[-1:]), pos, all_logits=False)
    return got


def pools(stages, dtype=torch.float32):
    """One KV pool per stage model, shaped by what its architecture caches (``ModelArgs.kv_dims``)."""
    return [KVPool(len(s.layers), *s.args.kv_dims[:2], 8, 4, dtype, CPU, s.args.kv_dims[2]) for s in stages]


@torch.inference_mode()
def reference_logits(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """transformers' logits [n, V] of every position: the first ``prompt`` in one forward, then one token at a
    time with its KV cache (the row shapes the stages see, so float32 sums round alike)."""
    out = model(ids[None, :prompt], use_cache=True)
    logits, past = [out.logits[0]], out.past_key_values
    for p in range(prompt, len(ids)):
        out = model(ids[None, p : p + 1], cache=past, use_cache=True)
        logits.append(out.logits[0])
        past = out.past_key_values
    return torch.cat(logits)


def assert_as_close_as_transformers_to_itself(got: torch.Tensor, model, ids: torch.Tensor, prompt: int) -> None:
    """``got`` within 1e-5 of the largest logit of transformers' step-by-step logits, or within twice what
    transformers' own one-forward logits differ from them by, if more (the tiny Mixtral with a large init
    amplifies float32 rounding: its own two ways differ by ~1e-5 relative)."""
    ref = reference_logits(model, ids, prompt)
    with torch.inference_mode():
        itself = (model(ids[None]).logits[0] - ref).abs().max()
    assert (got - ref).abs().max() <= max(1e-5 * ref.abs().max(), 2 * itself)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sparse_layers_are_transformers_sparse_layers(models, name):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32)
    theirs = [hasattr(layer.mlp, "experts") for layer in reference.model.layers]
    stage = load(models[name], 0, len(theirs))
    assert [isinstance(layer.mlp, SparseMoE) for layer in stage.layers] == theirs == SPARSE[name]
    for a, b in SPLITS[name][2]:  # a stage's layers are global layers: layer a + i is sparse as in the model
        assert [isinstance(layer.mlp, SparseMoE) for layer in load(models[name], a, b).layers] == SPARSE[name][a:b]


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_split_forward_matches_transformers(models, name, stages):
    from transformers import AutoModelForCausalLM

    path, split = models[name], SPLITS[name][stages - 1]
    assert [layer for a, b in split for layer in range(a, b)] == list(range(len(SPARSE[name])))  # each once, in order
    if stages > 1 and name.startswith("qwen3"):  # a cut between a dense and a sparse layer
        assert any(SPARSE[name][a - 1] != SPARSE[name][a] for a, _ in split[1:])
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(1))
    served = [load(path, a, b) for a, b in split]
    assert not served[0].fused  # float32 weights: the torch path
    caches = pools(served)
    got = torch.cat([run_stages(served, caches, ids[:16], 0)]
                    + [run_stages(served, caches, ids[p : p + 1], p) for p in range(16, 24)])
    assert_as_close_as_transformers_to_itself(got, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                                              ids, 16)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rows_route_to_different_experts(models, name, monkeypatch):
    """The tiny configs exercise routing: the prompt's rows pick many experts, not one pair for all."""
    picked = []
    real = SparseMoE.route
    monkeypatch.setattr(SparseMoE, "route", lambda self, logits: picked.append(real(self, logits)[1]) or real(self, logits))
    stage = load(models[name], 0, len(SPARSE[name]))
    run_stages([stage], pools([stage]), torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(1)), 0)
    assert len(picked) == sum(SPARSE[name])
    for index in picked:  # [16, k]
        assert len(set(index.flatten().tolist())) >= 4 and len({tuple(sorted(r)) for r in index.tolist()}) >= 4


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_tokens_match_transformers(models, name, split):
    path, prompt, new = models[name], [3, 17, 250, 9, 77, 401, 12], 10
    want = reference_greedy(path, prompt, new)
    served = [load(path, a, b) for a, b in SPLITS[name][split - 1]]
    assert greedy_through(served, prompt, new) == want


@pytest.fixture(scope="module")
def bf16_models(models, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("moe-bf16")
    for name in ("qwen3_moe", "mixtral"):
        AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.bfloat16).save_pretrained(root / name)
    return {name: root / name for name in ("qwen3_moe", "mixtral")}


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_fused_float32_path_matches_transformers(bf16_models, name):
    """bf16 weights, float32 activations: the fused (numba) path, attention with qk_norm and experts
    grouped by expert, computes what transformers computes on the widened weights."""
    from transformers import AutoModelForCausalLM

    path = bf16_models[name]
    ids = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(2))
    served = [load(path, a, b) for a, b in SPLITS[name][1]]
    assert all(s.fused and s.decode_group for s in served)
    caches = pools(served)
    got = torch.cat([run_stages(served, caches, ids[:12], 0)]
                    + [run_stages(served, caches, ids[p : p + 1], p) for p in range(12, 20)])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).float().eval()
    assert_as_close_as_transformers_to_itself(got, model, ids, 12)


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe_first_stage(bf16_models, request):
    """The first stage (dense and sparse layers) of a bf16 MoE, bf16 activations: the fused path."""
    backend = TorchBackend.load(bf16_models[request.param], "tiny-moe", 0, 3, "bfloat16", "cpu")
    backend.init_kv(23 * 12, 4)
    assert backend.model.fused
    return backend


def test_a_rows_hidden_state_depends_on_its_request_only(moe_first_stage):
    """As tests/test_bf16.py's for a dense model: request A's hidden states (bits) alone equal them beside
    other prompts and generated tokens (which share A's experts or not), in chunks of 1, 16 and the rest;
    its generated token's row alone equals it among 20 others."""
    backend, rng = moe_first_stage, np.random.default_rng(0)
    prompts = {"a": rng.integers(1, VOCAB, 40), "b": rng.integers(1, VOCAB, 37), "c": rng.integers(1, VOCAB, 3)}
    prompts |= {f"d{i}": rng.integers(1, VOCAB, 5) for i in range(20)}
    steps = RowSteps(backend, prompts)
    item, hidden = steps.item, steps.hidden

    alone = hidden([item("a", 0, 40)])["a"]
    hidden([item(f"d{i}", 0, 5) for i in range(20)])
    decoders = [item(f"d{i}", 5, 1, token=7 + i) for i in reversed(range(20))]
    mixed = hidden(decoders + [item("b", 0, 37), item("a", 0, 40), item("c", 0, 3)])
    assert np.array_equal(mixed["a"], alone)
    decoders = [item(f"d{i}", 6, 1, token=3 + i) for i in range(20)]
    chunks = [hidden(decoders + [item("a", 0, 1)])["a"], hidden([item("a", 1, 16)])["a"],
              hidden([item("b", 37, 1, token=5), item("a", 17, 23), item("c", 3, 1, token=6)])["a"]]
    assert np.array_equal(np.concatenate(chunks), alone)
    token_alone = hidden([item("a", 40, 1, token=11)])["a"]
    decoders = [item(f"d{i}", 7, 1, token=9 + i) for i in range(20)]
    assert np.array_equal(hidden(decoders[:9] + [item("a", 40, 1, token=11)] + decoders[9:])["a"], token_alone)


def test_a_decode_step_runs_only_the_routed_experts(moe_first_stage, monkeypatch):
    """Each expert runs once per step over the rows routed to it; the others are not read."""
    backend = moe_first_stage
    model: MoEStageModel = backend.model
    routes, runs = [], []
    real_route = SparseMoE.route
    monkeypatch.setattr(SparseMoE, "route", lambda self, logits: routes.append(real_route(self, logits)[1]) or
                        real_route(self, logits))
    for li, layer in enumerate(model.layers):
        if isinstance(layer.mlp, SparseMoE):
            for e, expert in enumerate(layer.mlp.experts):
                for proj in (expert.gate_up_proj.weight, expert.down_proj.weight):
                    def spy(x, proj=proj, key=(li, e, proj is expert.down_proj.weight)):
                        runs.append((key, x.shape[0]))
                        return type(proj).decode(proj, x)
                    monkeypatch.setattr(proj, "decode", spy)
    prompts = {f"r{i}": np.arange(1 + i, 6 + i) for i in range(3)}
    steps = RowSteps(backend, prompts)
    steps.hidden([steps.item(rid, 0, 5) for rid in prompts])  # prompt rows: the experts' prefill kernels
    assert runs == []
    routes.clear()
    steps.hidden([steps.item(rid, 5, 1, token=20 + k) for k, rid in enumerate(prompts)])  # 3 generated tokens
    sparse = [li for li, layer in enumerate(model.layers) if isinstance(layer.mlp, SparseMoE)]
    assert len(routes) == len(sparse) and sparse
    for li, index in zip(sparse, routes):  # index: [3, k]
        chosen = sorted(set(index.flatten().tolist()))
        for down in (False, True):
            ran = [(key[1], rows) for key, rows in runs if key[0] == li and key[2] == down]
            assert [e for e, _ in ran] == chosen  # each routed expert once, no other
            assert [rows for _, rows in ran] == [int((index == e).sum()) for e in chosen]  # over its rows only


@pytest.mark.parametrize("quantize", [None, "q8_0"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_stage_holds_what_its_profile_says(models, dtype, quantize):
    from parallax.stages.profile import model_profile

    path = models["qwen3_moe"]
    profile = model_profile(path, dtype, quantize=quantize)
    sizes = profile.layer_bytes_list
    assert len(sizes) == 5 and profile.layer_bytes == max(sizes)
    assert sizes[0] == sizes[3] != sizes[1] == sizes[2] == sizes[4]  # dense and sparse layers differ
    for a, b in SPLITS["qwen3_moe"][2] + [(0, 5), (2, 4)]:
        stage = load(path, a, b, getattr(torch, dtype), quantize)
        assert stage.weight_bytes == profile.range_bytes(a, b)
        assert stage.weight_bytes == sum(sizes[a:b]) + stage.first * profile.first_bytes + stage.last * profile.last_bytes


def test_old_profile_records_still_parse_and_a_wrong_list_does_not():
    old = ModelProfile.model_validate_json('{"num_layers": 3, "layer_bytes": 10, "first_bytes": 1, "last_bytes": 2, '
                                           '"kv_bytes_per_token": 4}')
    assert old.layer_bytes_list is None and old.per_layer == (10, 10, 10) and old.range_bytes(0, 3) == 33
    new = ModelProfile(num_layers=3, layer_bytes=30, first_bytes=1, last_bytes=2, kv_bytes_per_token=4,
                       layer_bytes_list=(5, 30, 7))
    assert ModelProfile.model_validate_json(new.model_dump_json()) == new
    assert new.range_bytes(0, 1) == 6 and new.range_bytes(1, 3) == 39
    with pytest.raises(ValueError, match="3 layers"):
        ModelProfile(num_layers=3, layer_bytes=30, first_bytes=1, last_bytes=2, kv_bytes_per_token=4,
                     layer_bytes_list=(5, 30))


# --- the planner and status with layers of different sizes ------------------------------------------


def test_planner_counts_each_layer_at_its_size():
    small_first = ModelCost(num_layers=4, layer_bytes=100, kv_reserve_bytes=0, first_bytes=5, last_bytes=5,
                            layer_bytes_list=(10, 10, 100, 100))
    a, b = NodeCapacity("a", 25, 1.0), NodeCapacity("b", 205, 1.0)
    assert max_layers(small_first, a, first=True) == 2 and max_layers(small_first, a) == 0
    assert max_layers(small_first, b, last=True) == 2 and max_layers(small_first, b) == 2
    result = plan(small_first, [a, b])  # with every layer at the largest size, node a could hold none
    assert [(p.node_id, p.start, p.end) for pipe in result.pipelines for p in pipe] == [("a", 0, 2), ("b", 2, 4)]
    uniform = ModelCost(num_layers=4, layer_bytes=100, kv_reserve_bytes=0, first_bytes=5, last_bytes=5)
    with pytest.raises(Unplaceable):
        plan(uniform, [a, b])
    same = ModelCost(num_layers=4, layer_bytes=100, kv_reserve_bytes=3, layer_bytes_list=(100,) * 4)
    for memory in (0, 102, 103, 205, 206, 500):
        node = NodeCapacity("n", memory, 1.0)
        assert max_layers(same, node) == max_layers(ModelCost(4, 100, 3), node) == min(4, memory // 103)


def test_planned_ranges_fit_their_nodes():
    """Random layer sizes, memories and speeds: every placed range (its layers at their sizes, KV reserve,
    embeddings or head where it holds them) fits its node."""
    rng = random.Random(7)
    for _ in range(40):
        layers = rng.randint(2, 12)
        sizes = tuple(rng.choice([10, 10, 60, 100]) for _ in range(layers))
        model = ModelCost(num_layers=layers, layer_bytes=max(sizes), kv_reserve_bytes=rng.choice([0, 5]),
                          first_bytes=rng.randint(0, 50), last_bytes=rng.randint(0, 50), layer_bytes_list=sizes)
        nodes = [NodeCapacity(f"n{i}", rng.randint(50, 500), rng.uniform(0.5, 2.0)) for i in range(rng.randint(1, 5))]
        try:
            result = plan(model, nodes)
        except Unplaceable:
            continue
        memory = {n.node_id: n.memory for n in nodes}
        for p in [p for pipe in result.pipelines for p in pipe]:
            held = sum(sizes[p.start:p.end]) + p.layers * model.kv_reserve_bytes
            held += (model.first_bytes if p.start == 0 else 0) + (model.last_bytes if p.end == layers else 0)
            assert held <= memory[p.node_id], (sizes, p)


def test_status_shows_a_stages_weights_at_their_sizes():
    from parallax.status import build_status, render_table

    profile = ModelProfile(num_layers=4, layer_bytes=3 << 20, first_bytes=1 << 20, last_bytes=2 << 20,
                           kv_bytes_per_token=64, layer_bytes_list=(1 << 20, 3 << 20, 1 << 20, 3 << 20))
    nodes = [NodeInfo(node_id="a", model="m", start=0, end=1, num_layers=4, memory_offered=10 << 20, profile=profile,
                      updated=1.0),
             NodeInfo(node_id="b", model="m", start=1, end=4, num_layers=4, memory_offered=10 << 20, profile=profile,
                      updated=1.0),
             NodeInfo(node_id="c", model="m", num_layers=4, memory_offered=10 << 20, profile=profile, updated=1.0)]
    status = build_status({n.key: n.model_dump_json().encode() for n in nodes}, now=1.0)
    held = {d["node_id"]: d["weight_bytes"] for d in status["nodes"]}
    assert held == {"a": 2 << 20, "b": 9 << 20, "c": None}  # embeddings + layer 0; layers 1..3 + head; no range
    rows = {line.split()[1]: line for line in render_table(status).splitlines() if line.startswith("stage")}
    assert "2.0 MiB/10.0 MiB" in rows["a"] and "9.0 MiB/10.0 MiB" in rows["b"] and " 10.0 MiB " in rows["c"]


def test_mixtral_sliding_window_slides_every_layer(models):
    """(Served since issue 11: ``tests/test_gpt_oss.py`` checks a windowed Mixtral against transformers.)"""
    config = json.loads((models["mixtral"] / "config.json").read_text())
    assert [architecture(config).ModelArgs.from_dict(config | {"sliding_window": 64}).window(i) for i in range(4)] == [64] * 4
    assert architecture(config).ModelArgs.from_dict(config).window(0) is None
    stage = load_stage_model(models["mixtral"], config | {"sliding_window": 64}, 0, 2, torch.float32, CPU)
    assert [layer.self_attn.window for layer in stage.layers] == [64, 64]


def test_a_gguf_of_an_unsupported_moe_architecture_is_refused(tmp_path):
    """(qwen3moe and Mixtral GGUFs are served: tests/test_moe_gguf.py.)"""
    import gguf

    from parallax.stages.gguf_weights import GGUFWeights

    path = tmp_path / "qwen2moe.gguf"
    writer = gguf.GGUFWriter(path, "qwen2moe")
    writer.add_block_count(1)
    writer.add_head_count(4)
    writer.add_uint32("qwen2moe.expert_count", 8)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModel, match="'qwen2moe'.*not supported.*have: .*qwen3moe"):
        GGUFWeights.open(path)


# --- parallax up ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_up_serves_a_moe_through_two_stages(smollm2_path, tmp_path):
    import httpx
    from transformers import AutoTokenizer

    from parallax.broker.server import free_port
    from tests.conftest import SMOLLM2_VOCAB
    from tests.processes import wait_gone

    folder = make_moe(tmp_path / "tiny-moe", "qwen3_moe", vocab=SMOLLM2_VOCAB)
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(folder)
    port, log = free_port(), open(tmp_path / "up.log", "w")
    up = subprocess.Popen([sys.executable, "-m", "parallax.cli", "up", "--model", str(folder), "--stages", "2",
                           "--port", str(port), "--nats-port", str(free_port())], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("parallax up never became healthy:\n" + (tmp_path / "up.log").read_text()[-3000:])
        reply = httpx.post(f"{base}/v1/completions", timeout=120,
                           json={"model": folder.name, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 4
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
        assert "Traceback" not in (tmp_path / "up.log").read_text()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        log.close()
        wait_gone(up.pid, 5)
