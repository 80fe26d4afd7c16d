"""What differs between architectures on the MLX backend: which of mlx-lm's decoder blocks a layer is,
what its attention hands the KV cache, how the checkpoint's tensors become the blocks' parameters, and
what the backend refuses (with the torch backend named, which serves every architecture).

* llama/mistral, qwen2, qwen3: mlx-lm's ``TransformerBlock``; keys and values ``[KV, head_dim]`` a position.
* qwen3_moe, mixtral: mlx-lm's MoE decoder layers (``SwitchGLU`` experts: every expert's matrices stacked
  into one ``[E, ...]`` tensor, as mlx-lm's ``sanitize`` stacks the per-expert HF tensors).
* deepseek_v3: mlx-lm's MLA layer. It hands the cache the compressed latent (``[1, kv_lora_rank]`` a
  position) as "keys" and the shared rope key (``[1, qk_rope_head_dim]``) as "values".
* gpt_oss: mlx-lm's ``TransformerBlock`` (attention sinks, SwitchGLU experts with gpt-oss's clamped SwiGLU);
  its sliding layers get a mask limited to the window (:attr:`Found.windows`, the torch side's
  ``ModelArgs.window``), its RoPE transformers' frequencies (mlx-lm's YaRN rounds its correction range, which
  gpt-oss's ``truncate: false`` turns off), its fused experts the layout mlx-lm's ``sanitize`` takes. Stages of
  the other architectures with a sliding-window layer are refused.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

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
    windows: bool = False  # whether its sliding-window layers are served (a mask limited to the window)
    prepare: Callable[[dict[str, mx.array]], dict[str, mx.array]] = lambda tensors: tensors  # before sanitize


def _dense_kv(args) -> tuple[int, int, int]:
    return args.kv_dims  # (KV, head_dim, head_dim), as the torch backend caches them


def _plain(arch: ModuleType, args, i: int) -> nn.Module:
    return arch.TransformerBlock(args)


def _gpt_oss_experts(tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """A float checkpoint's fused experts, ``...experts.gate_up_proj`` [E, D, 2I] and ``down_proj`` [E, I, D]
    (transformers' ``x @ W``), as ``...experts.<proj>.weight`` [E, O, I]: the layout of the MXFP4 blocks,
    which mlx-lm's ``sanitize`` takes (it splits gate_up's interleaved rows). MXFP4 ones pass as stored."""
    out = {}
    for name, t in tensors.items():
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            out[f"{name}.weight"] = mx.contiguous(t.swapaxes(-1, -2))
        else:
            out[name] = t
    return out


ARCHS = {
    "llama": Arch("llama", _plain, _dense_kv, gguf=True),
    "mistral": Arch("llama", _plain, _dense_kv, gguf=True),
    "qwen2": Arch("qwen2", _plain, _dense_kv, gguf=True),
    "qwen3": Arch("qwen3", _plain, _dense_kv, gguf=True),
    "qwen3_moe": Arch("qwen3_moe", lambda m, args, i: m.Qwen3MoeDecoderLayer(args, layer_idx=i), _dense_kv),
    "mixtral": Arch("mixtral", lambda m, args, i: m.MixtralDecoderLayer(args), _dense_kv),
    "gpt_oss": Arch("gpt_oss", _plain, _dense_kv, windows=True, prepare=_gpt_oss_experts),
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
    windows: tuple[int | None, ...]  # each of the stage's layers' sliding window (None: full attention)
    rope: "HFRoPE | None" = None  # the RoPE its attention layers take instead of mlx-lm's (gpt_oss)


def architecture(config: dict, start: int, end: int) -> Found:
    """mlx-lm's blocks for layers start:end of config's model, or a one-line refusal of what MLX does
    not serve."""
    model_type = config.get("model_type", "?")
    torch_arch = models.architecture(config)  # refuses what neither backend serves
    if model_type not in ARCHS:
        raise UnsupportedModel(f"model_type {model_type!r} is not served by the MLX backend "
                               f"(it serves {', '.join(ARCHS)}); {TORCH}")
    ours = torch_arch.ModelArgs.from_dict(config)  # the one reading of windows and head widths
    windows = tuple(ours.window(i) for i in range(start, min(end, ours.num_hidden_layers)))
    windowed = [start + j for j, w in enumerate(windows) if w is not None]
    if windowed and not ARCHS[model_type].windows:
        raise UnsupportedModel(f"layer {windowed[0]} has a sliding window, which the MLX backend does not serve; {TORCH}")
    if model_type == "mixtral" and ours.dim_head * ours.num_attention_heads != ours.hidden_size:
        raise UnsupportedModel(f"mixtral with head_dim {ours.dim_head} != hidden_size / heads is not served by the "
                               f"MLX backend; {TORCH}")
    if model_type == "deepseek_v3" and not ours.rope_interleave:
        raise UnsupportedModel(f"deepseek_v3 with rope_interleave false is not served by the MLX backend; {TORCH}")
    if model_type == "gpt_oss" and (ours.swiglu_alpha, ours.swiglu_limit) != SWIGLU_OAI:
        raise UnsupportedModel(f"gpt_oss with swiglu_alpha {ours.swiglu_alpha}, swiglu_limit {ours.swiglu_limit} is not "
                               f"served by the MLX backend (mlx-lm's are {SWIGLU_OAI}); {TORCH}")
    spec = ARCHS[model_type]
    module = importlib.import_module(f"mlx_lm.models.{spec.module}")
    rope = HFRoPE.of(config, ours.dim_head) if model_type == "gpt_oss" else None
    return Found(spec, module, module.ModelArgs.from_dict(mlx_config(config)), spec.kv(ours), windows, rope)


SWIGLU_OAI = (1.702, 7.0)  # (alpha, limit) of mlx-lm's SwigluOAI, which its gpt_oss experts use


class HFRoPE(nn.Module):
    """RoPE at transformers' frequencies (``ROPE_INIT_FUNCTIONS``, as the torch backend takes them): each
    vector times ``scaling``, rotated by ``position * inv_freq``, halves not interleaved (as mlx-lm's
    ``YarnRoPE`` applies its mscale)."""

    def __init__(self, inv_freq: np.ndarray, scaling: float):
        super().__init__()
        self._freqs = mx.array(1.0 / inv_freq.astype(np.float64), mx.float32)  # [hd/2]: mx.fast.rope's periods
        self.dims, self.scaling = 2 * len(inv_freq), scaling

    @classmethod
    def of(cls, config: dict, head_dim: int) -> "HFRoPE | None":
        """The config's RoPE, or None where it is the default (mlx-lm's ``nn.RoPE`` is that one)."""
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        kind = (config.get("rope_parameters") or config.get("rope_scaling") or {}).get("rope_type", "default")
        if kind == "default":
            return None
        if kind not in ROPE_INIT_FUNCTIONS or kind in ("dynamic", "longrope"):
            raise UnsupportedModel(f"rope_type {kind!r} is not served by the MLX backend; {TORCH}")
        hf = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
        inv, scaling = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
        if len(inv) * 2 != head_dim:
            raise UnsupportedModel(f"rope of {len(inv) * 2} dims in heads of {head_dim} is not served by the MLX "
                                   f"backend; {TORCH}")
        return cls(inv.double().numpy(), float(scaling))

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:  # [B, H, L, hd] -> same
        if self.scaling != 1.0:
            x = x * self.scaling
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs)


def sanitize(found: Found, start: int, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """mlx-lm's ``Model.sanitize`` on a stage's tensors (HF names, layers ``start``.. only): per-expert
    matrices stacked into SwitchGLU's ``[E, ...]``, DeepSeek's ``kv_b_proj`` split into ``embed_q`` /
    ``unembed_out``, gpt-oss's ``gate_up_proj`` split into gate and up (MXFP4 blocks viewed as MLX's uint32
    words; ``Arch.prepare`` first). The stage's layers are renamed 0.. for it (Mixtral's looks for layer 0's
    experts) and back; ``sanitize`` reads nothing of its model but ``args``, which is all it is given."""
    local = {_shift(k, -start): v for k, v in tensors.items()}
    done = found.module.Model.sanitize(SimpleNamespace(args=found.args), found.arch.prepare(local))
    return {_shift(k, start): v for k, v in done.items()}


def _shift(name: str, by: int) -> str:
    """``model.layers.{i}.rest`` -> ``model.layers.{i + by}.rest``; other names as they are."""
    if not name.startswith("model.layers."):
        return name
    _, _, i, rest = name.split(".", 3)
    return f"model.layers.{int(i) + by}.{rest}"
