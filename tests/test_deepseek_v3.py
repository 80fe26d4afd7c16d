"""deepseek_v3 on tiny random configs: float32 logits and greedy tokens equal transformers' through 1-, 2- and
3-stage splits (cuts between the dense and the MoE layers), routing equals transformers' router, the KV cache
holds the compressed latent (``kv_lora_rank + qk_rope_head_dim`` values per position and layer: transformers'
own cache entries), the profile counts what a stage holds, and a request's rows do not depend on the others."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parallax.broker.errors import UnsupportedModel
from parallax.stages.kv import KVPool, Rows
from parallax.stages.models import architecture
from parallax.stages.models.deepseek_v3 import DeepseekMoE, MLAttention
from parallax.stages.torch_backend import TorchBackend
from tests.cluster import reference_greedy
from tests.test_moe import assert_as_close_as_transformers_to_itself, greedy_through, load, pools, run_stages

CPU = torch.device("cpu")
VOCAB = 512
COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
              moe_intermediate_size=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
              initializer_range=0.3, max_position_embeddings=4096, num_experts_per_tok=2)
CONFIGS = {  # name -> (layers, config arguments); widths multiples of 32 so that q8_0 can quantize every matrix
    # compressed queries, 8 experts in 4 groups of which 2 are eligible, interleaved rope, layer 0 dense
    "lora": (4, dict(q_lora_rank=32, n_routed_experts=8, n_group=4, topk_group=2, first_k_dense_replace=1,
                     n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True)),
    # one q_proj, 6 experts in 2 groups of which 1 is eligible, not renormalised, plain rope, 2 dense layers
    "plain_q": (4, dict(q_lora_rank=None, n_routed_experts=6, n_group=2, topk_group=1, first_k_dense_replace=2,
                        n_shared_experts=2, routed_scaling_factor=1.5, norm_topk_prob=False, rope_interleave=False)),
    # yarn rope: cos/sin scaled by mscale / mscale_all_dim, the softmax scale by mscale_all_dim's factor squared
    "yarn": (3, dict(q_lora_rank=32, n_routed_experts=8, n_group=2, topk_group=2, first_k_dense_replace=1,
                     n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                     rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=0.9,
                                          mscale_all_dim=1.2, original_max_position_embeddings=1024))),
}
SPLITS = {  # 1, 2 and 3 stages; the cuts fall between the dense and the sparse layers (and inside each kind)
    "lora": [[(0, 4)], [(0, 1), (1, 4)], [(0, 1), (1, 3), (3, 4)]],
    "plain_q": [[(0, 4)], [(0, 2), (2, 4)], [(0, 1), (1, 2), (2, 4)]],
    "yarn": [[(0, 3)], [(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)]],
}


def make_deepseek(path: Path, name: str) -> Path:
    """A random DeepSeek-V3 saved as a float32 HF folder; routers scaled up (no near-ties in the top k) and
    random correction biases (they change which experts are chosen, not their weights)."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    layers, extra = CONFIGS[name]
    torch.manual_seed(0)
    config = DeepseekV3Config(num_hidden_layers=layers, vocab_size=VOCAB, **COMMON, **extra)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers[config.first_k_dense_replace :]:
            layer.mlp.gate.weight.mul_(4)
            layer.mlp.gate.e_score_correction_bias.copy_(torch.rand(config.n_routed_experts) * 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    return {name: make_deepseek(root / name, name) for name in CONFIGS}


def reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_first_k_dense_layers_then_experts(models):
    for name, (layers, extra) in CONFIGS.items():
        theirs = [type(layer.mlp).__name__ == "DeepseekV3MoE" for layer in reference(models[name]).model.layers]
        assert theirs == [i >= extra["first_k_dense_replace"] for i in range(layers)]
        for a, b in SPLITS[name][2] + [(0, layers)]:  # a stage's layer a + i is sparse as the model's
            assert [isinstance(layer.mlp, DeepseekMoE) for layer in load(models[name], a, b).layers] == theirs[a:b]


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_split_forward_matches_transformers(models, name, stages):
    path, split = models[name], SPLITS[name][stages - 1]
    layers, extra = CONFIGS[name]
    assert [layer for a, b in split for layer in range(a, b)] == list(range(layers))  # each once, in order
    if stages > 1:  # a cut between the dense and the sparse layers
        assert extra["first_k_dense_replace"] in [a for a, _ in split]
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(1))
    served = [load(path, a, b) for a, b in split]
    assert not served[0].fused and served[0].decode_group == 0  # the torch path
    caches = pools(served)
    got = torch.cat([run_stages(served, caches, ids[:10], 0), run_stages(served, caches, ids[10:16], 10)]
                    + [run_stages(served, caches, ids[p : p + 1], p) for p in range(16, 24)])
    assert_as_close_as_transformers_to_itself(got, reference(path), ids, 16)


@pytest.mark.parametrize("split", [3])  # 3 stages: both cuts (dense|MoE); the logits test covers 1/2/3 stages
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_tokens_match_transformers(models, name, split):
    path, prompt, new = models[name], [3, 17, 250, 9, 77, 401, 12], 10
    want = reference_greedy(path, prompt, new)
    served = [load(path, a, b) for a, b in SPLITS[name][split - 1]]
    assert greedy_through(served, prompt, new) == want


@pytest.mark.parametrize("name", list(CONFIGS))
def test_routing_equals_transformers_router(models, name):
    """Same experts and weights as DeepseekV3TopkRouter for 64 random rows; the rows pick many experts, only
    from ``topk_group`` groups each; the correction bias changes some rows' choice."""
    model, stage = reference(models[name]), load(models[name], 0, CONFIGS[name][0])
    _, extra = CONFIGS[name]
    E, G = extra["n_routed_experts"], extra["n_group"]
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    for theirs, ours in zip(model.model.layers, stage.layers):
        if not isinstance(ours.mlp, DeepseekMoE):
            continue
        with torch.inference_mode():
            _, want_w, want_i = theirs.mlp.gate(x)
            got_w, got_i = ours.mlp.route(F.linear(x, ours.mlp.gate.weight))
            order_w, order_g = want_i.sort(-1), got_i.sort(-1)
            assert torch.equal(order_w.values, order_g.values)
            assert torch.equal(want_w.gather(1, order_w.indices), got_w.gather(1, order_g.indices))
            unbiased = ours.mlp.e_score_correction_bias
            ours.mlp.e_score_correction_bias = torch.zeros_like(unbiased)
            assert not torch.equal(ours.mlp.route(F.linear(x, ours.mlp.gate.weight))[1].sort(-1).values, order_g.values)
            ours.mlp.e_score_correction_bias = unbiased
        assert len(set(got_i.flatten().tolist())) == E and len({tuple(r) for r in order_g.values.tolist()}) >= 5
        assert all(len({e // (E // G) for e in row}) <= extra["topk_group"] for row in got_i.tolist())


def test_the_cache_holds_transformers_compressed_latents(models):
    """Each layer's cache entry per position is kv_a_layernorm(latent) ++ rope'd shared key: transformers'
    own cache (its kv_nope and k_rot), one head of kv_lora_rank + qk_rope_head_dim values, no values pool."""
    path, table = models["lora"], [5, 2, 7, 0, 3, 1]
    stage = load(path, 0, 4)
    [pool] = pools([stage])
    assert pool.k.shape == (4, 32, 1, 32 + 8) and pool.v.numel() == 0
    ids = torch.randint(0, VOCAB, (13,), generator=torch.Generator().manual_seed(4))
    run_stages([stage], [pool], ids[:9], 0)
    for p in range(9, 13):
        run_stages([stage], [pool], ids[p : p + 1], p)
    with torch.inference_mode():
        cache = reference(path)(ids[None], use_cache=True).past_key_values
    slots = torch.tensor([table[p // 4] * 4 + p % 4 for p in range(13)])
    for layer in range(4):
        want = torch.cat((cache.layers[layer].keys[0, 0], cache.layers[layer].values[0, 0]), -1)  # [13, 32 + 8]
        torch.testing.assert_close(pool.k[layer, slots, 0], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_bytes_are_the_compressed_latents(models, dtype):
    from parallax.stages.profile import model_profile

    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    backend = TorchBackend.load(models["lora"], "tiny-dsv3", 1, 3, dtype, "cpu")
    assert backend.kv_block_bytes(16) == 2 * 16 * (32 + 8) * size  # 2 layers, 16 positions, rank + rope
    backend.init_kv(3, 16)
    assert backend.kv.k.nbytes + backend.kv.v.nbytes == 3 * backend.kv_block_bytes(16)
    assert model_profile(models["lora"], dtype).kv_bytes_per_token == (32 + 8) * size
    per_head = 2 * 4 * 16  # what per-head keys and values (H = 4, width 16) would take per position and layer
    assert (32 + 8) < per_head


@pytest.mark.parametrize("quantize", [None, "q8_0"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_stage_holds_what_its_profile_says(models, dtype, quantize):
    from parallax.stages.profile import model_profile

    path = models["lora"]
    profile = model_profile(path, dtype, quantize=quantize)
    sizes = profile.layer_bytes_list
    assert len(sizes) == 4 and profile.layer_bytes == max(sizes) and sizes[0] != sizes[1] == sizes[2] == sizes[3]
    for a, b in SPLITS["lora"][2] + [(0, 4), (1, 3)]:
        stage = load(path, a, b, getattr(torch, dtype), quantize)
        assert stage.weight_bytes == profile.range_bytes(a, b)
    router = load(path, 1, 2, getattr(torch, dtype), quantize).layers[0].mlp
    assert router.gate.weight.dtype == router.e_score_correction_bias.dtype == torch.float32  # as transformers keeps


def test_bf16_weights_run_through_their_projections(models, tmp_path):
    """bf16 weights on CPU (``kernels.Projection``), float32 activations: what transformers computes on the
    widened weights."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(models["lora"], dtype=torch.bfloat16).save_pretrained(tmp_path)
    served = [load(tmp_path, a, b) for a, b in SPLITS["lora"][1]]
    assert not isinstance(served[1].layers[0].self_attn.kv_b_proj.weight, torch.Tensor)
    ids = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(2))
    caches = pools(served)
    got = torch.cat([run_stages(served, caches, ids[:12], 0)]
                    + [run_stages(served, caches, ids[p : p + 1], p) for p in range(12, 20)])
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).float().eval()
    assert_as_close_as_transformers_to_itself(got, model, ids, 12)


def test_a_rows_result_depends_on_its_request_only(models):
    """float32 (the torch path): request A's logits alone equal them beside other prompts and generated tokens,
    in one step and in chunks, and a generated token's logits alone equal them among others, within float32
    rounding (torch's float32 GEMM rounds a row differently with different row counts: not bit for bit here),
    with the same greedy token."""
    stage = load(models["lora"], 0, 4)
    pool = KVPool(4, 1, 40, 60, 4, torch.float32, CPU, 0)
    rng = np.random.default_rng(0)
    prompts = {"a": rng.integers(1, VOCAB, 17), "b": rng.integers(1, VOCAB, 11)} | {
        f"d{i}": rng.integers(1, VOCAB, 3) for i in range(4)}
    tables = {rid: list(range(10 * k, 10 * k + 10)) for k, rid in enumerate(prompts)}

    def item(rid, pos, n, token=None):
        return rid, pos, n, torch.tensor(prompts[rid][pos : pos + n] if token is None else [token])

    @torch.inference_mode()
    def logits(items):  # one step over the items' rows -> each item's last row's logits
        rows = Rows.build([(tables[rid], pos, n, True) for rid, pos, n, _ in items], 4, CPU)
        out = stage(torch.cat([x for *_, x in items]), rows, pool)
        return {rid: row for (rid, *_), row in zip(items, out)}

    def same(got, want):
        assert int(got.argmax()) == int(want.argmax())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))

    alone = logits([item("a", 0, 17)])["a"]
    logits([item(f"d{i}", 0, 3) for i in range(4)])
    same(logits([item(f"d{i}", 3, 1, token=7 + i) for i in range(4)] + [item("b", 0, 11), item("a", 0, 17)])["a"], alone)
    logits([item("a", 0, 9), item("b", 0, 11)])
    same(logits([item("d0", 4, 1, token=3), item("a", 9, 8), item("d1", 4, 1, token=4)])["a"], alone)
    token_alone = logits([item("a", 17, 1, token=11)])["a"]
    same(logits([item("d2", 4, 1, token=5), item("a", 17, 1, token=11), item("b", 11, 1, token=6)])["a"], token_alone)


def test_requests_decoded_together_equal_each_alone(models):
    """Two backends (the dense layer | the MoE layers) over the wire format: three requests' greedy tokens,
    prompts and generated tokens in the same steps, equal each one decoded alone and transformers'."""
    from parallax.broker.wire import SamplingParams
    from parallax.stages.backend import SampleSpec, StepItem

    path = models["lora"]
    first, last = (TorchBackend.load(path, "tiny-dsv3", a, b, "float32", "cpu") for a, b in SPLITS["lora"][1])
    prompts = {"a": [3, 17, 250, 9, 77, 401, 12], "b": [5, 6, 7], "c": [400, 2, 99, 31, 8]}
    greedy = SamplingParams(temperature=0.0)

    def decode(rids: list[str], new: int) -> dict[str, list[int]]:
        for backend in (first, last):
            backend.init_kv(40, 4)
        tables = {rid: tuple(range(12 * k, 12 * k + 12)) for k, rid in enumerate(rids)}
        out = {rid: [] for rid in rids}
        for step in range(new):
            inputs = {rid: prompts[rid] if step == 0 else out[rid][-1:] for rid in rids}
            pos = {rid: 0 if step == 0 else len(prompts[rid]) + step - 1 for rid in rids}
            items = [StepItem(rid, pos[rid], len(inputs[rid]), memoryview(np.array(inputs[rid], np.int32).tobytes()),
                              "int32", None, tables[rid], prompt=step == 0) for rid in rids]
            hidden = first.run(items)
            rows = np.frombuffer(hidden.hidden, np.uint8).reshape(-1, hidden.row_bytes)
            at = np.cumsum([0] + [i.n for i in items])
            items = [StepItem(i.rid, i.pos, i.n, memoryview(rows[a:b].tobytes()), "float32",
                              SampleSpec(greedy, (), step), i.blocks, i.prompt) for i, a, b in zip(items, at, at[1:])]
            for rid, token in zip(rids, last.run(items).tokens):
                out[rid].append(token)
        return out

    together = decode(list(prompts), 8)
    for rid in prompts:
        assert decode([rid], 8)[rid] == together[rid] == reference_greedy(path, prompts[rid], 8)


def test_what_is_not_supported_is_refused_clearly(models):
    config = json.loads((models["lora"] / "config.json").read_text())
    args = architecture(config).ModelArgs.from_dict
    assert args(config).q_lora_rank == 32 and args(config | {"q_lora_rank": None}).q_lora_rank is None
    assert args(config).kv_dims == (1, 40, 0) and args(config).dim_head == 8
    for change, match in [({"num_key_value_heads": 2}, "num_key_value_heads == num_attention_heads"),
                          ({"n_group": 3}, "n_group 3 must divide"),
                          ({"topk_group": 5}, "topk_group 5"),
                          ({"n_shared_experts": 0}, "n_shared_experts"),
                          ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
                          ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear'"),
                          ({"quantization_config": {"quant_method": "fp8"}}, "fp8 checkpoints are not supported")]:
        with pytest.raises(UnsupportedModel, match=match):
            args(config | change)
    legacy = config | {"rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": 4.0, "mscale_all_dim": 1.0}}
    assert args(legacy).softmax_scale == pytest.approx(24 ** -0.5 * (0.1 * np.log(4.0) + 1) ** 2)


def test_attention_runs_mla_not_llama_attention(models):
    stage = load(models["plain_q"], 0, 2)
    attn = stage.layers[0].self_attn
    assert isinstance(attn, MLAttention) and not attn.compressed_q and not attn.interleaved
