"""GGUF tensors as stored (stages/gguf_weights.py), GGUF-backed model folders and stored-size profiles.

The reference for every tensor is what transformers makes of the same GGUF file when it loads it
(``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)``, float32): that checks the names, the
shapes and the un-permutation of llama's q/k rows; the quantized blocks are compared through
``gguf.quants.dequantize`` (exact).
"""

from __future__ import annotations

import mmap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize

from parallax.broker.model import ModelFacts, gguf_file, read_config, resolve_model
from parallax.stages import int4pack
from parallax.stages.gguf_weights import GGUFWeights
from parallax.stages.models import UnsupportedModel
from parallax.stages.profile import model_profile
from parallax.stages.quant import QuantMatrix

Q = gguf.GGMLQuantizationType
HIDDEN, FFN, VOCAB, HEADS, KV_HEADS, LAYERS = 64, 128, 96, 4, 2, 2
HEAD_DIM = {"llama": 16, "qwen2": 16, "qwen3": 128}  # transformers reads no head_dim for qwen3: its default, 128
QUANTIZABLE = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def add_tiny_tokenizer(w: gguf.GGUFWriter, vocab: int) -> None:
    """A byte-level BPE tokenizer of ``vocab`` tokens in a GGUF's metadata (what transformers needs to load it)."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<s>", "</s>"] + [chr(c) for c in range(33, 33 + vocab - 3)] + ['!"'])
    w.add_token_types([3, 3] + [1] * (vocab - 2))
    w.add_token_merges(['! "'])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)


def write_tiny_gguf(path: Path, arch: str, qtype: Q, tied: bool = False, seed: int = 0,
                    raw: dict[str, Q] | None = None, hidden: int = HIDDEN, name: str | None = None) -> Path:
    """A seeded random 2-layer model as llama.cpp writes it: matrices in ``qtype`` (``raw``: given GGUF
    names get random bytes of another type), vectors F32, a tiny byte-level BPE tokenizer."""
    rng, raw = np.random.default_rng(seed), raw or {}
    hd = HEAD_DIM[arch]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name or f"tiny-{arch}")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    add_tiny_tokenizer(w, VOCAB)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = rng.standard_normal((rows, cols), dtype=np.float32)
        if name in raw:
            block, size = gguf.GGML_QUANT_SIZES[raw[name]]
            w.add_tensor(name, rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8), raw_dtype=raw[name])
        elif qtype == Q.F32:
            w.add_tensor(name, data)
        elif qtype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    def vector(name: str, n: int) -> None:
        w.add_tensor(name, rng.standard_normal(n, dtype=np.float32))

    matrix("token_embd.weight", VOCAB, hidden)
    for i in range(LAYERS):
        vector(f"blk.{i}.attn_norm.weight", hidden)
        matrix(f"blk.{i}.attn_q.weight", HEADS * hd, hidden)
        matrix(f"blk.{i}.attn_k.weight", KV_HEADS * hd, hidden)
        matrix(f"blk.{i}.attn_v.weight", KV_HEADS * hd, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, HEADS * hd)
        if arch == "qwen2":
            for part, rows in (("q", HEADS * hd), ("k", KV_HEADS * hd), ("v", KV_HEADS * hd)):
                vector(f"blk.{i}.attn_{part}.bias", rows)
        if arch == "qwen3":
            vector(f"blk.{i}.attn_q_norm.weight", hd)
            vector(f"blk.{i}.attn_k_norm.weight", hd)
        vector(f"blk.{i}.ffn_norm.weight", hidden)
        matrix(f"blk.{i}.ffn_gate.weight", FFN, hidden)
        matrix(f"blk.{i}.ffn_up.weight", FFN, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, FFN)
    vector("output_norm.weight", hidden)
    if not tied:
        matrix("output.weight", VOCAB, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_state(path: Path) -> dict[str, torch.Tensor]:
    """The float32 state dict transformers loads (dequantizes, un-permutes) from a GGUF file."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.state_dict()


def as_float32(value: torch.Tensor | QuantMatrix) -> torch.Tensor:
    if isinstance(value, QuantMatrix):
        return torch.from_numpy(gguf.quants.dequantize(value.blocks, value.qtype)).reshape(value.shape)
    return value.float()


def on_heap(array: np.ndarray) -> bool:
    """No array in the chain of bases is a memory map (of the GGUF file)."""
    while array is not None:
        if isinstance(array, (np.memmap, mmap.mmap)):
            return False
        array = array.base if isinstance(array, np.ndarray) else None
    return True


def assert_matches_transformers(path: Path, tied: bool) -> GGUFWeights:
    weights = GGUFWeights.open(path)
    reference = transformers_state(path)
    assert weights.names() | ({"lm_head.weight"} if tied else set()) == set(reference)
    assert ("lm_head.weight" in weights.names()) == (not tied)
    for name in sorted(weights.names()):
        got = weights.get(name, torch.float32)
        assert tuple(got.shape) == tuple(reference[name].shape), name
        assert torch.equal(as_float32(got), reference[name]), name
        if isinstance(got, QuantMatrix):
            assert got.blocks.dtype == np.uint8 and got.blocks.flags.c_contiguous and on_heap(got.blocks), name
    return weights


# ----------------------------------------------------------------------------- tensors vs transformers


@pytest.mark.parametrize("qtype", QUANTIZABLE + [Q.F16, Q.F32], ids=lambda q: q.name)
def test_llama_tensors_equal_transformers(tmp_path, qtype):
    weights = assert_matches_transformers(write_tiny_gguf(tmp_path / "tiny.gguf", "llama", qtype), tied=False)
    q_proj = weights.get("model.layers.1.self_attn.q_proj.weight", torch.bfloat16)
    norm = weights.get("model.layers.1.input_layernorm.weight", torch.bfloat16)
    assert norm.dtype == torch.bfloat16  # vectors in the dtype asked for
    if qtype in QUANTIZABLE:
        assert isinstance(q_proj, QuantMatrix) and q_proj.qtype == qtype
        assert weights.stored_bytes("model.layers.1.self_attn.q_proj.weight") == q_proj.nbytes
    else:  # float matrices as stored, whatever dtype is asked for
        assert q_proj.dtype == {Q.F16: torch.float16, Q.F32: torch.float32}[qtype]


def test_mistral_is_a_llama_gguf(tmp_path):
    """llama.cpp writes Mistral as architecture "llama" (q/k permuted); transformers names it by general.name
    but cannot load its tensors (gguf-py has no "mistral" architecture), so the reference is the same file
    named as a llama, checked against transformers above."""
    mistral = GGUFWeights.open(write_tiny_gguf(tmp_path / "m.gguf", "llama", Q.Q4_0, name="mistral"))
    llama = GGUFWeights.open(write_tiny_gguf(tmp_path / "l.gguf", "llama", Q.Q4_0))
    assert mistral.names() == llama.names()
    for name in mistral.names():
        assert torch.equal(as_float32(mistral.get(name, torch.float32)), as_float32(llama.get(name, torch.float32)))
    config = read_config(resolve_model(str(mistral.path), cache_dir=tmp_path / "cache").path)
    assert (config["model_type"], config["architectures"]) == ("mistral", ["MistralForCausalLM"])


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.Q5_0], ids=lambda q: q.name)
def test_qwen_tensors_equal_transformers(tmp_path, arch, qtype):
    weights = assert_matches_transformers(write_tiny_gguf(tmp_path / "tiny.gguf", arch, qtype, tied=True), tied=True)
    extra = {"qwen2": "self_attn.q_proj.bias", "qwen3": "self_attn.q_norm.weight"}[arch]
    assert f"model.layers.0.{extra}" in weights.names()


def test_llama_q_and_k_rows_are_unpermuted(tmp_path):
    """The GGUF stores q/k rows permuted; what ``get`` returns differs from the file's order (and v does not)."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", Q.Q8_0)
    weights, reader = GGUFWeights.open(path), gguf.GGUFReader(str(path))
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    for part, gguf_part, moved in (("q", "attn_q", True), ("k", "attn_k", True), ("v", "attn_v", False)):
        blocks = weights.get(f"model.layers.0.self_attn.{part}_proj.weight", torch.float32).blocks
        assert np.array_equal(blocks, stored[f"blk.0.{gguf_part}.weight"]) != moved
        assert sorted(map(bytes, blocks)) == sorted(map(bytes, stored[f"blk.0.{gguf_part}.weight"]))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quants_are_blocks_as_stored(tmp_path, qtype):
    """K-quant matrices (random bytes: gguf cannot write them) come back as their blocks, rows un-permuted
    the way transformers' llama processor un-permutes rows."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    names = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_up.weight"]
    path = write_tiny_gguf(tmp_path / "k.gguf", "llama", Q.Q8_0, raw=dict.fromkeys(names, qtype), hidden=256)
    weights, reader = GGUFWeights.open(path), gguf.GGUFReader(str(path))
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    unpermute = LlamaTensorProcessor({"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    for hf, name in zip(["self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"], names):
        got = weights.get(f"model.layers.0.{hf}.weight", torch.float32)
        want = unpermute.process(stored[name], name).weights
        assert isinstance(got, QuantMatrix) and got.qtype == qtype and on_heap(got.blocks)
        assert np.array_equal(got.blocks, want), hf


def test_unsupported_type_is_a_clear_error(tmp_path):
    path = write_tiny_gguf(tmp_path / "q2.gguf", "llama", Q.Q8_0, raw={"blk.1.ffn_up.weight": Q.Q2_K}, hidden=256)
    weights = GGUFWeights.open(path)
    assert isinstance(weights.get("model.layers.1.mlp.down_proj.weight", torch.float32), QuantMatrix)
    with pytest.raises(UnsupportedModel) as info:
        weights.get("model.layers.1.mlp.up_proj.weight", torch.float32)
    text = str(info.value)
    assert "model.layers.1.mlp.up_proj.weight" in text and "Q2_K" in text and "\n" not in text
    with pytest.raises(UnsupportedModel, match="no tensor for model.layers.7.mlp.up_proj.weight"):
        weights.get("model.layers.7.mlp.up_proj.weight", torch.float32)


def test_unsupported_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModel, match="architecture 'gpt2'"):
        GGUFWeights.open(tmp_path / "gpt2.gguf")


@pytest.mark.slow
def test_smollm2_layers_equal_transformers_dequantization():
    """Layers 0 and 29 and the embedding of the bundled Q4_1 GGUF equal the dense folder transformers made."""
    from safetensors import safe_open

    served, dense = resolve_model("smollm2-135m"), resolve_model("smollm2-135m", dequantize=True)
    weights = GGUFWeights.open(gguf_file(served.path))
    names = sorted(n for n in weights.names() if n.startswith(("model.layers.0.", "model.layers.29.", "model.embed")))
    assert len(names) == 19 and "lm_head.weight" not in weights.names()  # tied
    with safe_open(next(dense.path.glob("*.safetensors")), "pt") as reference:
        for name in names:
            got = weights.get(name, torch.float32)
            assert isinstance(got, QuantMatrix) == (len(got.shape) == 2), name  # Q4_1, the embedding Q8_0
            assert torch.equal(as_float32(got), reference.get_tensor(name)), name


# ----------------------------------------------------------------------------- folders and profiles


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "Tiny-Llama.Q4_0.gguf", "llama", Q.Q4_0)


def test_gguf_resolves_to_a_folder_without_weights(tiny_gguf, tmp_path):
    from transformers import AutoTokenizer

    found = resolve_model(str(tiny_gguf), cache_dir=tmp_path)
    assert found.name == "Tiny-Llama.Q4_0"
    assert not list(found.path.glob("*.safetensors"))
    assert (found.path / "model.gguf").is_symlink() and gguf_file(found.path) == tiny_gguf.resolve()
    assert (found.path / "generation_config.json").is_file()
    config = read_config(found.path)
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert ModelFacts.read(found.path).num_layers == LAYERS and config["hidden_size"] == HIDDEN
    assert AutoTokenizer.from_pretrained(found.path)("ab")["input_ids"] == [66, 67]
    assert resolve_model(str(tiny_gguf), cache_dir=tmp_path) == found

    dense = resolve_model(str(tiny_gguf), cache_dir=tmp_path, dequantize=True)
    assert dense.path != found.path and dense.path.parent == found.path.parent
    assert gguf_file(dense.path) is None and list(dense.path.glob("*.safetensors"))
    assert ModelFacts.read(dense.path) == ModelFacts.read(found.path)


def test_qwen3_folder_records_head_dim(tmp_path):
    path = write_tiny_gguf(tmp_path / "q3.gguf", "qwen3", Q.Q8_0, tied=True)
    config = read_config(resolve_model(str(path), cache_dir=tmp_path / "cache").path)
    assert (config["model_type"], config["head_dim"], config["tie_word_embeddings"]) == ("qwen3", 128, True)


def test_profile_counts_gguf_bytes_as_stored(tiny_gguf, tmp_path):
    folder = resolve_model(str(tiny_gguf), cache_dir=tmp_path).path
    reader = gguf.GGUFReader(str(tiny_gguf))
    stored = {t.name: int(t.n_bytes) for t in reader.tensors}
    layer = sum(n for name, n in stored.items() if name.startswith("blk.0."))
    profile = model_profile(folder, "float32")  # the F32 norms: stored as served
    assert profile.layer_bytes == layer
    assert profile.first_bytes == stored["token_embd.weight"]
    assert profile.last_bytes == stored["output.weight"] + stored["output_norm.weight"]
    assert profile.kv_bytes_per_token == 2 * KV_HEADS * HEAD_DIM["llama"] * 4
    halves = model_profile(folder, "bfloat16")  # vectors and KV in the serving dtype, matrices as stored
    vectors = sum(n for name, n in stored.items() if name.startswith("blk.0.") and name.endswith("norm.weight"))
    # ... or, for Q4_0 matrices a bf16 stage may hold in torch's int4 layout, that layout's size (20 bytes per 32)
    int4 = sum(int(t.n_elements) // 32 * 2 for t in reader.tensors if t.name.startswith("blk.0.") and t.tensor_type == Q.Q4_0
               and int4pack.eligible(Q.Q4_0, (int(t.shape[1]), int(t.shape[0])), torch.bfloat16))
    assert halves.layer_bytes == layer - vectors // 2 + int4
    assert halves.kv_bytes_per_token == profile.kv_bytes_per_token // 2


@pytest.mark.parametrize("dtype, size", [(torch.bfloat16, 2), (torch.float32, 4)], ids=str)
def test_profile_counts_safetensors_as_stored_or_quantized(tmp_path, dtype, size):
    from tests.conftest import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "m", layers=2, vocab=VOCAB)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).save_pretrained(folder)
    matrices = HIDDEN * (HIDDEN + 2 * 32 + HIDDEN) + 3 * HIDDEN * FFN  # q, k, v (2 kv heads of 16), o; mlp
    for serving in ("float32", "bfloat16"):
        profile = model_profile(folder, serving)  # bf16 weights as stored; float32 ones cast once to a bf16 serving dtype
        served = 4 if serving == "float32" else 2
        norms = 2 * HIDDEN * served
        assert profile.layer_bytes == matrices * min(size, served) + norms
        assert profile.first_bytes == VOCAB * HIDDEN * min(size, served)
    q8 = model_profile(folder, "bfloat16", quantize="q8_0")
    assert q8.layer_bytes == matrices // 32 * 34 + 2 * HIDDEN * 2
    assert model_profile(folder, "bfloat16", quantize="q4_0").first_bytes == VOCAB * HIDDEN // 32 * 18
    with pytest.raises(ValueError, match="quantize must be one of"):
        model_profile(folder, "bfloat16", quantize="q2_k")


@pytest.mark.slow
def test_header_scan_agrees_with_gguf_reader_on_the_bundled_model():
    from parallax.broker.model import smollm2_gguf
    from parallax.stages.gguf_weights import _scan

    path = smollm2_gguf()
    reader = gguf.GGUFReader(str(path))
    fields, infos = _scan(path)
    assert infos == [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset))
                     for t in reader.tensors]
    scalars = {k: f.contents() for k, f in reader.fields.items()
               if not k.startswith("GGUF.") and f.types and f.types[0] != gguf.GGUFValueType.ARRAY}
    assert fields == scalars
