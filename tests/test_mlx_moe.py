"""The mixture-of-experts architectures on the MLX backend (tiny random configs, routers scaled up as in
tests/test_moe.py): float32 logits equal transformers', a stage holds its own layers' experts stacked as
SwitchGLU's [E, ...] tensors, greedy tokens through a torch 0:k + MLX k:N split equal transformers', and
what MLX does not serve is refused in one line that names the torch backend."""

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


@pytest.mark.parametrize("name", list(MODELS))
def test_float32_logits_equal_transformers(models, name):
    """A prompt, then decode rows reading the paged KV (DeepSeek's: the compressed latent)."""
    path = models[name]
    b = load(MLXBackend, path, 0, layers(path))
    b.sampler = Logits()
    tokens = list(PROMPT)
    out = b.run([item("a", 0, ids(tokens), len(tokens), range(4))])
    for _ in range(3):
        tokens.append(out.tokens[0])
        out = b.run([item("a", len(tokens) - 1, ids(tokens[-1:]), 1, range(4), prompt=False)])
    expected = transformers_logits(path, tokens)
    assert len(b.sampler.seen) == 4
    for k, got in enumerate(b.sampler.seen):
        torch.testing.assert_close(got[0], expected[len(PROMPT) - 1 + k], atol=5e-4, rtol=1e-4)


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
        "gpt_oss": (GptOssConfig(**tiny, num_local_experts=4), r"model_type 'gpt_oss' is not served by the MLX"),
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
