"""Mixture-of-experts GGUFs served from their own blocks (qwen3moe, and Mixtral as llama.cpp writes it: a
``llama`` GGUF with an ``expert_count``), the planner's speed estimate of a MoE layer, and --quantize of an HF
MoE (experts in blocks, the router as stored).

The GGUFs are written here in llama.cpp's layout (``convert_hf_to_gguf.py``: the experts of a layer stacked
into ``blk.N.ffn_{gate,up,down}_exps`` [E, O, I], the router ``ffn_gate_inp``, llama's q/k rows permuted)
from a tiny random transformers model; the reference is transformers float32 on the exactly dequantized
weights (``gguf.quants.dequantize`` of the very blocks written)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file

from parallax.broker.errors import UsageError
from parallax.broker.model import read_config, resolve_model
from parallax.stages import kernels
from parallax.stages.models.moe import SparseMoE
from parallax.stages.profile import active_layer_bytes, estimate_layer_ms, model_profile
from parallax.stages.quant import QuantMatrix
from parallax.stages.torch_backend import load_stage_model
from tests.cluster import reference_greedy
from tests.test_gguf_weights import add_tiny_tokenizer, on_heap
from tests.test_moe import assert_as_close_as_transformers_to_itself, greedy_through, pools, run_stages

Q = gguf.GGMLQuantizationType
CPU = torch.device("cpu")
VOCAB, LAYERS, SPLIT = 512, 3, [(0, 2), (2, 3)]
COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.1,
              max_position_embeddings=4096, num_experts_per_tok=2, num_hidden_layers=LAYERS, vocab_size=VOCAB)
# name -> (model_type, GGUF architecture, config arguments, {what: GGUF type}); every layer has experts (as
# llama.cpp's qwen3moe and Mixtral graphs have them)
MODELS = {
    "qwen3moe": ("qwen3_moe", "qwen3moe",
                 dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8, norm_topk_prob=True),
                 dict(experts=Q.Q8_0, router=Q.F32, matrix=Q.Q8_0)),  # a router in F32, as llama.cpp writes it
    "mixtral": ("mixtral", "llama", dict(intermediate_size=64, num_local_experts=6),
                dict(experts=Q.Q4_0, router=Q.Q8_0, matrix=Q.F16)),
}
EXPERT_NAMES = {"qwen3moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
                "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}
GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def make_hf_moe(path: Path, name: str) -> dict[str, torch.Tensor]:
    """A random MoE saved as a float32 HF folder (routers scaled up: no row's top k is a near-tie); its tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, _, extra, _ = MODELS[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **COMMON, **extra), dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(4)
    model.save_pretrained(path)
    return load_file(path / "model.safetensors")  # the checkpoint's names: one tensor per expert


def llama_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of q/k rows (each head's two rotary halves interleaved)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def stored(data: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """(what the GGUF holds, its exact float32 value) of a float32 array [..., I] in ``qtype``."""
    if qtype == Q.F32:
        return data, data
    if qtype == Q.F16:
        return data.astype(np.float16), data.astype(np.float16).astype(np.float32)
    blocks = quantize(data, qtype)
    return blocks, dequantize(blocks, qtype).reshape(data.shape)


def write_moe_gguf(path: Path, name: str, state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The HF checkpoint ``state`` as llama.cpp's converter writes it; returns the state of exactly those values."""
    _, arch, extra, types = MODELS[name]
    prefix, (gate, up, down) = EXPERT_NAMES[name]
    E, hd = config.get("num_experts") or config["num_local_experts"], config["head_dim"]
    exact: dict[str, torch.Tensor] = {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{name}")
    w.add_block_count(LAYERS)
    w.add_context_length(4096)
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    w.add_vocab_size(VOCAB)
    w.add_expert_count(E)
    w.add_expert_used_count(config["num_experts_per_tok"])
    if arch == "qwen3moe":
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    else:
        w.add_rope_dimension_count(hd)
    add_tiny_tokenizer(w, VOCAB)

    def tensor(gguf_name: str, hf_names: list[str], qtype: Q, heads: int | None = None) -> None:
        data = np.stack([state[n].numpy() for n in hf_names]) if len(hf_names) > 1 else state[hf_names[0]].numpy()
        held, value = stored(data, qtype if data.ndim > 1 else Q.F32)  # vectors F32
        if heads is not None and arch == "llama":
            held = llama_permute(held, heads)
        w.add_tensor(gguf_name, held, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) and data.ndim > 1 else None)
        for i, hf in enumerate(hf_names):
            exact[hf] = torch.from_numpy(np.ascontiguousarray(value[i] if len(hf_names) > 1 else value))

    tensor("token_embd.weight", ["model.embed_tokens.weight"], types["matrix"])
    for i in range(LAYERS):
        for hf, short in GGUF_LAYER.items():
            if f"model.layers.{i}.{hf}.weight" in state:
                heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}.get(short)
                tensor(f"blk.{i}.{short}.weight", [f"model.layers.{i}.{hf}.weight"], types["matrix"], heads)
        tensor(f"blk.{i}.ffn_gate_inp.weight", [f"model.layers.{i}.{prefix}.gate.weight"], types["router"])
        for proj, short in ((gate, "gate"), (up, "up"), (down, "down")):
            experts = [f"model.layers.{i}.{prefix}.experts.{e}.{proj}.weight" for e in range(E)]
            tensor(f"blk.{i}.ffn_{short}_exps.weight", experts, types["experts"])
    tensor("output_norm.weight", ["model.norm.weight"], Q.F32)
    tensor("output.weight", ["lm_head.weight"], types["matrix"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert set(exact) == set(state)
    return exact


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """name -> (the HF float32 folder, the GGUF, its served folder, the HF folder of the GGUF's exact values)."""
    root = tmp_path_factory.mktemp("moe-gguf")
    made = {}
    for name in MODELS:
        hf = root / f"{name}-hf"
        state = make_hf_moe(hf, name)
        file = root / f"Tiny-{name}.gguf"
        exact = write_moe_gguf(file, name, state, read_config(hf))
        reference = root / f"{name}-exact"
        reference.mkdir()
        save_file(exact, reference / "model.safetensors", metadata={"format": "pt"})
        (reference / "config.json").write_text((hf / "config.json").read_text())
        made[name] = (hf, file, resolve_model(str(file), cache_dir=root / "cache").path, reference)
    return made


@pytest.fixture(scope="module")
def served(moe):
    """name -> the GGUF's stage models of ``SPLIT``, float32."""
    return {name: [load(moe[name][2], a, b) for a, b in SPLIT] for name in MODELS}


def load(path: Path, start: int, end: int):
    return load_stage_model(path, read_config(path), start, end, torch.float32, CPU)


@pytest.mark.parametrize("name", list(MODELS))
def test_moe_gguf_matches_transformers_through_two_stages(moe, served, name, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, _, folder, reference = moe[name]
    assert AutoTokenizer.from_pretrained(folder)("ab")["input_ids"][-2:] == [66, 67]  # the GGUF's own vocabulary
    config = read_config(folder)
    want = read_config(hf)
    assert config["model_type"] == want["model_type"] and config["architectures"] == want["architectures"]
    for key in ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "intermediate_size",
                "head_dim", "norm_topk_prob"):
        assert config.get(key) == want.get(key), key
    served = served[name]
    assert all(s.fused for s in served)  # float32 over blocks: the numba path, experts and router included
    picked, route = [], SparseMoE.route
    monkeypatch.setattr(SparseMoE, "route", lambda self, logits: picked.append(route(self, logits)[1]) or
                        route(self, logits))
    ids = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(1))
    caches = pools(served)
    got = torch.cat([run_stages(served, caches, ids[:12], 0)]
                    + [run_stages(served, caches, ids[p : p + 1], p) for p in range(12, 20)])
    assert all(len(set(index.flatten().tolist())) >= 4 for index in picked[:LAYERS])  # the prompt's rows spread
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    assert_as_close_as_transformers_to_itself(got, model, ids, 12)
    prompt = [3, 17, 250, 9, 77, 401, 12]
    assert greedy_through(served, prompt, 10) == reference_greedy(reference, prompt, 10)


@pytest.mark.parametrize("name", list(MODELS))
def test_experts_are_slices_of_the_mapped_file_and_the_router_is_as_stored(moe, served, name):
    types = MODELS[name][3]
    reader = gguf.GGUFReader(str(moe[name][1]))
    tensors = {t.name: t for t in reader.tensors}
    layers = [layer for stage in served[name] for layer in stage.layers]
    assert len(layers) == LAYERS
    for i, layer in enumerate(layers):
        moe_layer = layer.mlp
        assert isinstance(moe_layer, SparseMoE)
        router = moe_layer.gate.weight
        if types["router"] == Q.F32:
            assert isinstance(router, kernels.Matrix) and router.weight.dtype == torch.float32
        else:
            assert isinstance(router, QuantMatrix) and router.qtype == types["router"]
        for short in ("gate", "up", "down"):
            t = tensors[f"blk.{i}.ffn_{short}_exps.weight"]
            parts = []
            for expert in moe_layer.experts:
                weight = expert.down_proj.weight if short == "down" else expert.gate_up_proj.weight.parts[short == "up"]
                assert isinstance(expert.gate_up_proj.weight, kernels.Stacked)  # gate and up apart: not copied
                assert isinstance(weight, QuantMatrix) and weight.qtype == types["experts"]
                assert not on_heap(weight.blocks) and not weight.blocks.flags.owndata
                parts.append(weight.blocks)
            each = parts[0].nbytes
            assert each * len(parts) == int(t.n_bytes)
            addresses = [p.ctypes.data for p in parts]
            assert addresses == [addresses[0] + e * each for e in range(len(parts))]  # one tensor, expert by expert
            assert np.array_equal(np.concatenate(parts).reshape(-1), np.asarray(t.data).reshape(-1).view(np.uint8))


@pytest.mark.parametrize("name", list(MODELS))
def test_profile_counts_moe_gguf_layers_as_stored(moe, served, name):
    _, file, folder, _ = moe[name]
    reader = gguf.GGUFReader(str(file))
    stored_bytes = {t.name: int(t.n_bytes) for t in reader.tensors}
    profile = model_profile(folder, "float32")  # float32: the F32 norms count as stored
    layers = [sum(n for t, n in stored_bytes.items() if t.startswith(f"blk.{i}.")) for i in range(LAYERS)]
    assert list(profile.layer_bytes_list) == layers
    assert profile.first_bytes == stored_bytes["token_embd.weight"]
    for (a, b), stage in zip(SPLIT, served[name]):
        assert stage.weight_bytes == profile.range_bytes(a, b)


def test_a_moe_gguf_is_not_dequantized(moe):
    _, file, _, _ = moe["mixtral"]
    with pytest.raises(UsageError, match="mixture-of-experts GGUF.*drop --dequantize"):
        resolve_model(str(file), cache_dir=file.parent / "dense-cache", dequantize=True)


# --- the speed estimate of a MoE layer ------------------------------------------------------------------


def test_a_moe_layer_is_estimated_at_its_active_experts(moe, monkeypatch):
    """A token reads k of the E experts of a layer: the estimate times a product over the attention, the
    router and k/E of the experts' bytes (by construction: the matrix it times has that many bytes)."""
    _, file, folder, _ = moe["qwen3moe"]
    stored_bytes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(file)).tensors}
    config = read_config(folder)
    k, E = config["num_experts_per_tok"], config["num_local_experts"]
    experts = sum(n for t, n in stored_bytes.items() if t.startswith("blk.0.") and "_exps" in t)
    whole = sum(n for t, n in stored_bytes.items() if t.startswith("blk.0."))
    active = active_layer_bytes(folder, "float32")
    assert active == round(whole - experts + experts * k / E) and active < whole * 0.5
    assert model_profile(folder, "float32").layer_bytes == whole  # what a stage holds: every expert

    timed = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, *rest: timed.append(w.shape) or real(x, w, *rest))
    estimate_layer_ms(active, config["hidden_size"], "float32", "cpu", budget_s=0.0)
    estimate_layer_ms(whole, config["hidden_size"], "float32", "cpu", budget_s=0.0)
    rows = sorted({shape[0] for shape in timed})
    assert rows == [active // (64 * 4), whole // (64 * 4)]
    assert rows[0] / rows[1] == pytest.approx((whole - experts * (1 - k / E)) / whole, rel=0.01)


def test_a_dense_model_is_estimated_whole(tmp_path):
    from tests.conftest import save_tiny_llama

    path = save_tiny_llama(tmp_path / "dense", layers=2, vocab=VOCAB)
    assert active_layer_bytes(path, "float32") == model_profile(path, "float32").layer_bytes


# --- --quantize of an HF MoE ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, quant, dtype", [("qwen3moe", "q4_0", "float32"), ("mixtral", "q8_0", "bfloat16")])
def test_quantize_puts_experts_in_blocks_and_keeps_the_router(moe, name, quant, dtype):
    """The float32 checkpoint's router stays float32 in a float32 stage (cast once to bf16 in a bf16 one)."""
    hf = moe[name][0]
    stage = load_stage_model(hf, read_config(hf), 0, 2, getattr(torch, dtype), CPU, quant)
    for layer in stage.layers:
        router = layer.mlp.gate.weight
        assert isinstance(router, kernels.Matrix) and router.weight.dtype == getattr(torch, dtype)
        for expert in layer.mlp.experts:
            for w in (expert.gate_up_proj.weight, expert.down_proj.weight, layer.self_attn.o_proj.weight):
                assert isinstance(w, QuantMatrix) and w.qtype.name.lower() == quant
    assert stage.weight_bytes == model_profile(hf, dtype, quantize=quant).range_bytes(0, 2)
