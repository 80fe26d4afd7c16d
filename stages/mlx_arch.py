"""What differs between architectures on the MLX backend: which of mlx-lm's decoder blocks a layer is,
what its attention hands the KV cache, how the checkpoint's tensors become the blocks' parameters, and
what the backend refuses (with the torch backend named, which serves every architecture).

* llama/mistral, qwen2, qwen3: mlx-lm's ``TransformerBlock``; keys and values ``[KV, head_dim]`` a position.
* qwen3_moe, mixtral: mlx-lm's MoE decoder layers (``SwitchGLU`` experts: every expert's matrices stacked
  into one ``[E, ...]`` tensor, as mlx-lm's ``sanitize`` stacks the per-expert HF tensors).
* deepseek_v3: mlx-lm's MLA layer. It hands the cache the compressed latent (``[1, kv_lora_rank]`` a
  position) as "keys" and the shared rope key (``[1, qk_rope_head_dim]``) as "values".
* gpt_oss: refused (attention sinks with sliding windows); so is any stage with a sliding-window layer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace

import mlx.core as mx
import mlx.nn as nn

from parallax.broker.errors import UnsupportedModel

from . import models

TORCH = "use --backend torch, which serves it"


@dataclass(frozen=True)
class Arch:
    """An architecture on MLX: mlx-lm's module, its decoder block for global layer ``i``, the KV
    cache's (heads, key width, value width) a position."""

    module: str  # mlx_lm.models.<module>
    block: Callable[[ModuleType, object, int], nn.Module]  # (module, ModelArgs, global layer) -> block
    kv: Callable[[object], tuple[int, int, int]]  # the torch model's ModelArgs -> (KV, k_dim, v_dim)
    gguf: bool = False  # whether its GGUF files are read (those of the dense Llama-family layers)


def _dense_kv(args) -> tuple[int, int, int]:
    return args.kv_dims  # (KV, head_dim, head_dim), as the torch backend caches them


def _plain(arch: ModuleType, args, i: int) -> nn.Module:
    return arch.TransformerBlock(args)


ARCHS = {
    "llama": Arch("llama", _plain, _dense_kv, gguf=True),
    "mistral": Arch("llama", _plain, _dense_kv, gguf=True),
    "qwen2": Arch("qwen2", _plain, _dense_kv, gguf=True),
    "qwen3": Arch("qwen3", _plain, _dense_kv, gguf=True),
    "qwen3_moe": Arch("qwen3_moe", lambda m, args, i: m.Qwen3MoeDecoderLayer(args, layer_idx=i), _dense_kv),
    "mixtral": Arch("mixtral", lambda m, args, i: m.MixtralDecoderLayer(args), _dense_kv),
    "deepseek_v3": Arch("deepseek_v3", lambda m, args, i: m.DeepseekV3DecoderLayer(args, layer_idx=i),
                        lambda args: (1, args.kv_lora_rank, args.qk_rope_head_dim)),
}


def mlx_config(config: dict) -> dict:
    """config.json as mlx-lm's ModelArgs read it: transformers 5 nests ``rope_theta`` (and scaling)
    under ``rope_parameters``, which mlx-lm's models do not look at (they would fall back to their
    default base), and calls Qwen3-MoE's ``num_experts`` ``num_local_experts``."""
    out = dict(config)
    rope = out.get("rope_parameters") or {}
    if out.get("rope_theta") is None and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    if not out.get("rope_scaling") and rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = rope
    if out.get("model_type") == "qwen3_moe" and not out.get("num_experts"):
        out["num_experts"] = out.get("num_local_experts")
    out["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    return out


@dataclass(frozen=True)
class Found:
    """What :func:`architecture` found: the Arch, mlx-lm's module and ModelArgs, the KV entry's shape."""

    arch: Arch
    module: ModuleType
    args: object  # mlx-lm's ModelArgs
    kv: tuple[int, int, int]  # (KV, k_dim, v_dim) a position and layer


def architecture(config: dict, start: int, end: int) -> Found:
    """mlx-lm's blocks for layers start:end of config's model, or a one-line refusal of what MLX does
    not serve."""
    model_type = config.get("model_type", "?")
    torch_arch = models.architecture(config)  # refuses what neither backend serves
    if model_type not in ARCHS:
        raise UnsupportedModel(f"model_type {model_type!r} is not served by the MLX backend "
                               f"(it serves {', '.join(ARCHS)}); {TORCH}")
    ours = torch_arch.ModelArgs.from_dict(config)  # the one reading of windows and head widths
    windowed = [i for i in range(start, min(end, ours.num_hidden_layers)) if ours.window(i) is not None]
    if windowed:
        raise UnsupportedModel(f"layer {windowed[0]} has a sliding window, which the MLX backend does not serve; {TORCH}")
    if model_type == "mixtral" and ours.dim_head * ours.num_attention_heads != ours.hidden_size:
        raise UnsupportedModel(f"mixtral with head_dim {ours.dim_head} != hidden_size / heads is not served by the "
                               f"MLX backend; {TORCH}")
    if model_type == "deepseek_v3" and not ours.rope_interleave:
        raise UnsupportedModel(f"deepseek_v3 with rope_interleave false is not served by the MLX backend; {TORCH}")
    spec = ARCHS[model_type]
    module = importlib.import_module(f"mlx_lm.models.{spec.module}")
    return Found(spec, module, module.ModelArgs.from_dict(mlx_config(config)), spec.kv(ours))


def sanitize(module: ModuleType, args, start: int, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """mlx-lm's ``Model.sanitize`` on a stage's tensors (HF names, layers ``start``.. only): per-expert
    matrices stacked into SwitchGLU's ``[E, ...]``, DeepSeek's ``kv_b_proj`` split into ``embed_q`` /
    ``unembed_out``. The stage's layers are renamed 0.. for it (Mixtral's looks for layer 0's experts) and
    back; ``sanitize`` reads nothing of its model but ``args``, which is all it is given."""
    local = {_shift(k, -start): v for k, v in tensors.items()}
    done = module.Model.sanitize(SimpleNamespace(args=args), local)
    return {_shift(k, start): v for k, v in done.items()}


def _shift(name: str, by: int) -> str:
    """``model.layers.{i}.rest`` -> ``model.layers.{i + by}.rest``; other names as they are."""
    if not name.startswith("model.layers."):
        return name
    _, _, i, rest = name.split(".", 3)
    return f"model.layers.{int(i) + by}.{rest}"
