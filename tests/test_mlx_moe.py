"""The mixture-of-experts architectures on the MLX backend (tiny random configs, routers scaled up as in
tests/test_moe.py): float32 logits equal transformers', a stage holds its own layers' experts stacked as
SwitchGLU's [E, ...] tensors, greedy tokens through a torch 0:k + MLX k:N split equal transformers', gpt-oss
(sliding windows shorter than the text, sinks, MXFP4 experts kept as MXFP4) does too, and what MLX does not serve
is refused in one line that names the torch backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")

from parallax.broker.errors import UnsupportedModel  # noqa: E402
from parallax.stages.mlx_backend import MLXBackend, StageModel  # noqa: E402
from parallax.stages.torch_backend import TorchBackend  # noqa: E402
from tests.cluster import ids, reference_greedy  # noqa: E402
from tests.test_deepseek_v3 import make_deepseek  # noqa: E402
from tests.test_gpt_oss import WINDOW, make_gpt_oss, quantize_experts  # noqa: E402
from tests.test_mlx import PROMPT, Logits, item, load, run_split, transformers_logits  # noqa: E402
from tests.test_moe import make_moe  # noqa: E402

# name -> (how to make it, the cut of the torch 0:k + MLX k:N split, an expert layer the MLX stage holds and
# the HF name of its experts' gate projection)
MODELS = {
    "qwen3_moe": (make_moe, 3, 4, "mlp.experts.{e}.gate_proj.weight"),  # MLX 3:5 = dense 3, sparse 4
    "mixtral": (make_moe, 2, 3, "block_sparse_moe.experts.{e}.w1.weight"),
    "lora": (make_deepseek, 1, 2, "mlp.experts.{e}.gate_proj.weight"),  # deepseek_v3: torch the dense layer 0
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx-moe")
    return {name: make(root / name, name) for name, (make, *_) in MODELS.items()}


def layers(path) -> int:
    return json.loads((path / "config.json").read_text())["num_hidden_layers"]


def decode(b: MLXBackend, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """PROMPT, then ``steps`` decode rows reading the paged KV: the tokens and each step's logits [V]."""
    b.sampler = Logits()
    tokens = list(PROMPT)
    out = b.run([item("a", 0, ids(tokens), len(tokens), range(8))])
    for _ in range(steps):
        tokens.append(out.tokens[0])
        out = b.run([item("a", len(tokens) - 1, ids(tokens[-1:]), 1, range(8), prompt=False)])
    assert len(b.sampler.seen) == steps + 1
    return tokens, [got[0] for got in b.sampler.seen]


def assert_logits_equal(got: list[torch.Tensor], expected: torch.Tensor) -> None:
    for k, row in enumerate(got):
        torch.testing.assert_close(row, expected[len(PROMPT) - 1 + k], atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_float32_logits_equal_transformers(models, name):
    """A prompt, then decode rows reading the paged KV (DeepSeek's: the compressed latent)."""
    path = models[name]
    tokens, got = decode(load(MLXBackend, path, 0, layers(path)), 3)
    assert_logits_equal(got, transformers_logits(path, tokens))


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_then_mlx_split_equals_transformers(models, name):
    """torch 0:k + MLX k:N: the MLX stage holds exactly its layers, its experts stacked from the
    checkpoint's (expert e of layer i at [e]), and the chain decodes greedily like transformers."""
    from safetensors.numpy import load_file

    _, cut, layer, expert_name = MODELS[name]
    path = models[name]
    n = layers(path)
    chain = [load(TorchBackend, path, 0, cut), load(MLXBackend, path, cut, n)]
    model = chain[1].model
    assert len(model.layers) == n - cut and "embed_tokens" not in model
    mlp = model.layers[layer - cut]
    stacked = np.array((mlp.block_sparse_moe if name == "mixtral" else mlp.mlp).switch_mlp.gate_proj.weight)
    checkpoint = load_file(str(path / "model.safetensors"))
    experts = [checkpoint[f"model.layers.{layer}.{expert_name.format(e=e)}"] for e in range(stacked.shape[0])]
    np.testing.assert_array_equal(stacked, np.stack(experts))
    assert run_split(chain, PROMPT, 4) == reference_greedy(path, PROMPT, 4)


def test_what_mlx_does_not_serve_is_refused_in_one_line():
    from transformers import DeepseekV3Config, GptOssConfig, MixtralConfig

    tiny = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=64,
                num_hidden_layers=2, head_dim=16)
    cases = {
        "gpt_oss swiglu": (GptOssConfig(**tiny, num_local_experts=4, swiglu_limit=5.0), r"gpt_oss with swiglu_alpha"),
        "window": (MixtralConfig(**tiny, sliding_window=8), r"layer 0 has a sliding window"),
        "mixtral head_dim": (MixtralConfig(**{**tiny, "head_dim": 32}), r"mixtral with head_dim 32"),
        "plain rope": (DeepseekV3Config(**{**tiny, "num_key_value_heads": 4}, rope_interleave=False),
                       r"rope_interleave false"),
    }
    for case, (config, message) in cases.items():
        with pytest.raises(UnsupportedModel, match=message) as caught:
            StageModel(config.to_dict(), 0, 2)
        assert str(caught.value).endswith("use --backend torch, which serves it"), case
        assert "\n" not in str(caught.value), case


# --- gpt-oss: layers alternating sliding (window 5) and full attention, sinks, fused experts ----------------


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """test_gpt_oss's tiny gpt-oss in float32, its experts as MXFP4 (Hugging Face's layout), and the MXFP4
    one's exact dequantization (transformers' reference for it)."""
    root = tmp_path_factory.mktemp("mlx-gpt-oss")
    make_gpt_oss(root / "float")
    quantize_experts(root / "float", root / "mxfp4", root / "dequantized")
    return root


GPT_OSS = {"float": "float", "mxfp4": "dequantized"}  # served folder -> transformers' reference folder


@pytest.mark.parametrize("name", list(GPT_OSS))
def test_gpt_oss_float32_logits_equal_transformers(gpt_oss, name):
    """11 prompt tokens and 6 decode rows, windows of 5: the sliding layers see only their window (the same
    stage attending to every key gives other logits), MXFP4 experts computed as stored."""
    b = load(MLXBackend, gpt_oss / name, 0, 4)
    assert b.model.windows == (WINDOW, None, WINDOW, None)
    tokens, got = decode(b, 6)
    expected = transformers_logits(gpt_oss / GPT_OSS[name], tokens)
    assert_logits_equal(got, expected)
    unwindowed = load(MLXBackend, gpt_oss / name, 0, 4)
    unwindowed.model.windows = (None,) * 4
    _, other = decode(unwindowed, 6)
    assert max(float((a - b).abs().max()) for a, b in zip(got, other)) > 1e-2


def test_gpt_oss_mxfp4_experts_stay_mxfp4_as_stored(gpt_oss):
    """The stage's experts hold the checkpoint's MXFP4 bytes (gate rows 0, 2, .. of gate_up, up rows 1, 3, ..,
    down as is) and scales in MLX's mxfp4 mode; the float checkpoint's are its transposed slices."""
    from safetensors.numpy import load_file

    held = load(MLXBackend, gpt_oss / "mxfp4", 2, 4).model.layers[0].mlp.experts  # layer 2
    stored = load_file(str(gpt_oss / "mxfp4" / "model.safetensors"))
    blocks, scales = (stored[f"model.layers.2.mlp.experts.gate_up_proj_{k}"] for k in ("blocks", "scales"))
    for proj, rows in ((held.gate_proj, slice(0, None, 2)), (held.up_proj, slice(1, None, 2))):
        assert proj.mode == "mxfp4" and (proj.group_size, proj.bits) == (32, 4)
        E, O = blocks.shape[:2]
        np.testing.assert_array_equal(np.array(proj.weight).view(np.uint8), blocks[:, rows].reshape(E, O // 2, -1))
        np.testing.assert_array_equal(np.array(proj.scales), scales[:, rows])
    np.testing.assert_array_equal(np.array(held.down_proj.scales), stored["model.layers.2.mlp.experts.down_proj_scales"])
    dense = load(MLXBackend, gpt_oss / "float", 2, 4).model.layers[0].mlp.experts
    fused = load_file(str(gpt_oss / "float" / "model.safetensors"))["model.layers.2.mlp.experts.gate_up_proj"]  # [E, D, 2I]
    np.testing.assert_array_equal(np.array(dense.up_proj.weight), fused[:, :, 1::2].transpose(0, 2, 1))


@pytest.mark.parametrize("name", list(GPT_OSS))
def test_gpt_oss_torch_then_mlx_split_equals_transformers(gpt_oss, name):
    """torch 0:2 + MLX 2:4 (a sliding and a full layer each), 11 prompt tokens and 8 new ones."""
    chain = [load(TorchBackend, gpt_oss / name, 0, 2), load(MLXBackend, gpt_oss / name, 2, 4)]
    assert run_split(chain, PROMPT, 8) == reference_greedy(gpt_oss / GPT_OSS[name], PROMPT, 8)
