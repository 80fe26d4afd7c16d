"""A stage loads only its layers; every layer is served exactly once; split logits equal the full model."""

from __future__ import annotations

import json

import pytest
import torch

from parallax.broker.layers import even_split
from parallax.stages.kv import KVPool, Rows
from parallax.stages.models import UnsupportedModel, architecture
from parallax.stages.torch_backend import SafetensorsWeights, load_stage_model
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


def load(path, start, end, dtype=torch.float32, quantize=None):
    return load_stage_model(path, json.loads((path / "config.json").read_text()), start, end, dtype, CPU, quantize)


def test_first_stage_reads_only_its_layers_and_embeddings(models, monkeypatch):
    read = []
    real = SafetensorsWeights.get
    monkeypatch.setattr(SafetensorsWeights, "get", lambda self, name, dtype: read.append(name) or real(self, name, dtype))
    stage = load(models["llama"], 0, 2)
    assert sorted(read) == sorted({"model.embed_tokens.weight"} | {f"model.layers.{i}.{p}" for i in range(2) for p in LAYER_PARAMS})
    full = load(models["llama"], 0, 6)
    per_layer = sum(n for n in full.held().values()) - full.embed_tokens.nbytes - full.lm_head.nbytes - full.norm.weight.nbytes
    assert stage.weight_bytes == stage.embed_tokens.weight.nbytes + 2 * per_layer // 6


def test_middle_and_last_stage_parameters(models):
    middle = load(models["llama"], 2, 4)
    assert not hasattr(middle, "embed_tokens") and not hasattr(middle, "lm_head")
    assert len(middle.layers) == 2
    last = load(models["llama"], 4, 6)
    assert isinstance(last.lm_head.weight, torch.Tensor) and "norm.weight" in dict(last.named_parameters())
    assert not hasattr(last, "embed_tokens")


def test_layers_keep_global_weights_stacked_once(models):
    from safetensors import safe_open

    stage = load(models["llama"], 3, 5)
    with safe_open(models["llama"] / "model.safetensors", framework="pt") as f:
        for local, global_ in [(0, 3), (1, 4)]:
            attn = stage.layers[local].self_attn
            qkv = [f.get_tensor(f"model.layers.{global_}.self_attn.{p}_proj.weight") for p in "qkv"]
            assert torch.equal(attn.qkv_proj.weight, torch.cat(qkv))  # float32 as stored, one stacked tensor
            assert not hasattr(attn, "q_proj")  # the parts are not kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tied_embeddings_are_one_object(models, dtype):
    from safetensors import safe_open

    last = load(models["tied"], 3, 5, dtype)
    with safe_open(models["tied"] / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
        embed = f.get_tensor("model.embed_tokens.weight")
    head = last.lm_head.weight if dtype == torch.float32 else last.lm_head.weight.weight
    assert torch.equal(head, embed.to(dtype))
    whole = load(models["tied"], 0, 5, dtype)
    assert whole.embed_tokens.weight is whole.lm_head.weight  # one object serves both
    assert whole.weight_bytes == sum(whole.held().values())
    assert whole.weight_bytes == last.weight_bytes + load(models["tied"], 0, 3, dtype).weight_bytes - head.nbytes


def test_bf16_weights_stay_bf16_whatever_the_activation_dtype(models, tmp_path):
    """A bf16 checkpoint served with float32 activations keeps its bf16 weights (no float32 copy) and
    computes what transformers computes on the widened weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    stage = load(tmp_path / "bf16", 0, 6)
    down = stage.layers[0].mlp.down_proj.weight
    assert down.weight.dtype == torch.bfloat16 and down.nbytes == down.weight.numel() * 2
    ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.float()(ids[None]).logits[0]
    pool = KVPool(6, stage.args.kv_heads, stage.args.dim_head, 8, 4, torch.float32, CPU)
    got = run_stages([stage], [pool], ids, 0)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


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
    with pytest.raises(UnsupportedModel, match="chunked_attention"):
        architecture({"model_type": "qwen2", "layer_types": ["chunked_attention"]})


def test_range_outside_model(models):
    with pytest.raises(ValueError, match="outside"):
        load(models["llama"], 4, 9)


LAYER_PARAMS = [
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
]
