"""A stage loads only its layers; every layer is served exactly once; split logits equal the full model."""

from __future__ import annotations

import json

import pytest
import torch

from parallax.broker.layers import even_split
from parallax.stages.kv import KVPool, Rows
from parallax.stages.models import UnsupportedModel, architecture
from parallax.stages.torch_backend import load_stage_model
from tests.cluster import make_tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": make_tiny_model(root / "llama", "llama", layers=6),
        "tied": make_tiny_model(root / "tied", "llama", layers=5, tied=True),
        "qwen2": make_tiny_model(root / "qwen2", "qwen2", layers=4),
        "qwen3": make_tiny_model(root / "qwen3", "qwen3", layers=4),
    }


def load(path, start, end):
    return load_stage_model(path, json.loads((path / "config.json").read_text()), start, end, torch.float32, CPU)


def test_first_stage_holds_only_its_layers_and_embeddings(models):
    stage = load(models["llama"], 0, 2)
    names = set(dict(stage.named_parameters()))
    assert names == {"embed_tokens.weight"} | {f"layers.{i}.{p}" for i in range(2) for p in LAYER_PARAMS}
    full = load(models["llama"], 0, 6)
    per_layer = sum(p.numel() for p in full.layers[0].parameters())
    assert sum(p.numel() for p in stage.parameters()) == stage.embed_tokens.weight.numel() + 2 * per_layer


def test_middle_and_last_stage_parameters(models):
    middle = load(models["llama"], 2, 4)
    assert not hasattr(middle, "embed_tokens") and not hasattr(middle, "lm_head")
    assert len(middle.layers) == 2
    last = load(models["llama"], 4, 6)
    assert {"norm.weight", "lm_head.weight"} <= set(dict(last.named_parameters()))
    assert not hasattr(last, "embed_tokens")


def test_layers_keep_global_weights(models):
    from safetensors import safe_open

    stage = load(models["llama"], 3, 5)
    with safe_open(models["llama"] / "model.safetensors", framework="pt") as f:
        for local, global_ in [(0, 3), (1, 4)]:
            expected = f.get_tensor(f"model.layers.{global_}.self_attn.q_proj.weight")
            assert torch.equal(stage.layers[local].self_attn.q_proj.weight, expected)


def test_tied_embeddings_feed_the_last_stage(models):
    from safetensors import safe_open

    last = load(models["tied"], 3, 5)
    with safe_open(models["tied"] / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert torch.equal(last.lm_head.weight, f.get_tensor("model.embed_tokens.weight"))


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5, 6])
def test_even_split_serves_every_layer_once_in_order(stages):
    ranges = even_split(6, stages)
    served = [layer for a, b in ranges for layer in range(a, b)]
    assert served == list(range(6))


@pytest.mark.parametrize("name", ["llama", "tied", "qwen2", "qwen3"])
def test_split_forward_matches_transformers(models, name):
    from transformers import AutoModelForCausalLM

    path = models[name]
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    ids = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids[None]).logits[0]
    stages = [load(path, a, b) for a, b in even_split(layers, 3)]
    caches = [KVPool(len(s.layers), s.args.kv_heads, s.args.dim_head, 8, 4, torch.float32, CPU) for s in stages]
    got = [run_stages(stages, caches, ids[:16], 0)] + [run_stages(stages, caches, ids[p : p + 1], p) for p in range(16, 24)]
    got = torch.cat(got)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@torch.inference_mode()
def run_stages(stages, pools, x, pos):
    n, table = x.shape[0], [5, 2, 7, 0, 3, 1]  # any blocks, in any order: 6 blocks of 4 rows
    for stage, pool in zip(stages, pools):
        rows = Rows.build([(table, pos, n, True)], 4, CPU)
        rows.sample_rows = torch.arange(n)  # all logits, to compare every position
        x = stage(x, rows, pool)
    return x


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(UnsupportedModel, match="gpt2"):
        architecture({"model_type": "gpt2"})
    with pytest.raises(UnsupportedModel, match="sliding"):
        architecture({"model_type": "qwen2", "use_sliding_window": True})


def test_range_outside_model(models):
    with pytest.raises(ValueError, match="outside"):
        load(models["llama"], 4, 9)


LAYER_PARAMS = [
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
]
