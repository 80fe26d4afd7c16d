"""gpt-oss (gpt-oss-20b, gpt-oss-120b): the Llama-family decoder with

* attention with sinks: a learned logit per head (``self_attn.sinks``) that joins the softmax's denominator
  and adds nothing to the output; q/k/v/o with biases; layers alternating sliding-window and full attention
  (``layer_types``);
* a mixture of experts in every layer: the router (``mlp.router``, with a bias) takes the top k logits and
  softmaxes them; each expert's gate and up projections are one matrix whose rows interleave them (gate j in
  row 2j, up j in row 2j + 1), followed by gpt-oss's clamped SwiGLU ``(clamp(up, ±limit) + 1) * g *
  sigmoid(alpha * g)`` with ``g = min(gate, limit)``, and a down projection; every projection has a bias.

Checkpoints hold the experts fused over experts, as transformers keeps them: ``gate_up_proj`` [E, D, 2I] and
``down_proj`` [E, I, D] (x @ W, transposed against ``nn.Linear``) with biases [E, 2I] and [E, D]; or, in the
released checkpoints, as MXFP4 ``gate_up_proj_blocks`` [E, 2I, D/32, 16] + ``gate_up_proj_scales``
[E, 2I, D/32] (already [O, I] per expert). ``ExpertSource`` reads them one expert at a time (safetensors
slices) into the per-expert form ``moe.by_expert`` runs: MXFP4 stays MXFP4 (``stages.mxfp4``).

Every stage runs the torch path (the fused kernels know no sinks): float32, CUDA, or bf16 with the CPU
kernels' ``matmul``. The math is transformers' eager ``modeling_gpt_oss``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from parallax.broker.errors import UnsupportedModel

from ..kv import Decode, KVCache
from ..mxfp4 import MXFP4Matrix
from .llama import Attention, DecoderLayer, Linear, RMSNorm, StageModel as LlamaStageModel
from .moe import MoEArgs, by_expert

if TYPE_CHECKING:
    from ..torch_backend import TensorSource

_EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(gate_up_proj|down_proj)\.(weight|bias)$")


@dataclass(frozen=True)
class ModelArgs(MoEArgs):
    attention_bias: bool = True
    norm_topk_prob: bool = True  # (a softmax over the top k logits: the top k probabilities sum to one)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        quant = (config.get("quantization_config") or {}).get("quant_method")
        if quant not in (None, "mxfp4"):
            raise UnsupportedModel(f"gpt_oss quantized as {quant!r} is not supported (have: stored MXFP4 experts, or "
                                   f"float checkpoints)")
        return super().from_dict(config)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.swiglu_limit <= 0:
            raise UnsupportedModel(f"swiglu_limit must be positive; got {self.swiglu_limit}")


class RMSNormF32(RMSNorm):
    """gpt-oss's RMSNorm: scaled in float32, then cast (Llama's casts first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps)).to(x.dtype)


class ExpertLinear(Linear):
    """A Linear that also takes an ``MXFP4Matrix`` weight (its bias kept inside it)."""

    def load(self, weight, bias: torch.Tensor | None) -> None:
        if not isinstance(weight, MXFP4Matrix):
            return super().load(weight, bias)
        if weight.shape != (self.out_features, self.in_features):
            raise UnsupportedModel(f"weight of shape {weight.shape} where the config needs "
                                   f"{(self.out_features, self.in_features)}")
        self.weight = weight.with_bias(bias)


class SinkAttention(Attention):
    """Attention whose softmax has one more logit per head, ``sinks`` [H], with no value (eager math in the
    activation dtype, as transformers' ``eager_attention_forward``)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, layer)
        self.sinks = nn.Parameter(torch.zeros(args.num_attention_heads), requires_grad=False)
        self.scale = self.hd ** -0.5

    def _decode(self, q: torch.Tensor, d: Decode, kv: KVCache) -> torch.Tensor:
        B, KV = q.shape[0], self.kv_heads  # q: [B, H, hd]
        keys, values, mask = self._decode_keys(d, kv)  # [B, KV, L, hd] x2, [B, 1, 1, L]
        scores = q.view(B, KV, -1, self.hd) @ keys.transpose(2, 3) * self.scale  # [B, KV, G, L]
        o = self._attend(scores, mask, values, self.sinks.view(1, KV, -1, 1))  # [B, KV, G, hd]
        return o.reshape(B, self.heads, self.hd)

    def _prefill(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: int) -> torch.Tensor:
        n, KV = q.shape[0], self.kv_heads  # q: [n, H, hd]; keys/values: [pos+n, KV, hd]
        qg = q.view(n, KV, -1, self.hd).permute(1, 2, 0, 3)  # [KV, G, n, hd]
        scores = qg @ keys.permute(1, 2, 0)[:, None] * self.scale  # [KV, G, n, L]
        mask = self._prefill_mask(pos, n, q.device)  # [n, L]
        o = self._attend(scores, mask, values.transpose(0, 1)[:, None], self.sinks.view(KV, -1, 1, 1))  # [KV, G, n, hd]
        return o.permute(2, 0, 1, 3).reshape(n, self.heads, self.hd)

    @staticmethod
    def _attend(scores: torch.Tensor, mask: torch.Tensor | None, values: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
        """softmax over [scores, sink] (masked keys out), the sink's share dropped, times values."""
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        logits = torch.cat([scores, sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)], dim=-1)  # [..., L + 1]
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1)[..., :-1]
        return probs.to(values.dtype) @ values


class Expert(nn.Module):
    """One expert: ``gate_up_proj`` [2I, D] (gate and up rows interleaved), the clamped SwiGLU, ``down_proj``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        width = args.moe_intermediate_size or args.intermediate_size
        self.gate_up_proj = ExpertLinear(args.hidden_size, 2 * width, bias=True)
        self.down_proj = ExpertLinear(width, args.hidden_size, bias=True)
        self.alpha, self.limit = args.swiglu_alpha, args.swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, D] -> [n, D]
        gate_up = self.gate_up_proj(x)  # [n, 2I]
        gate = gate_up[:, 0::2].clamp(min=None, max=self.limit)
        up = gate_up[:, 1::2].clamp(min=-self.limit, max=self.limit)
        return self.down_proj((up + 1) * (gate * torch.sigmoid(gate * self.alpha)))


class GptOssMoE(nn.Module):
    """Router (``router``: [E, D] + bias) and experts, grouped by expert (``moe.by_expert``)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.router = Linear(args.hidden_size, args.num_experts, bias=True)
        self.experts = nn.ModuleList(Expert(args) for _ in range(args.num_experts))
        self.top_k = args.num_experts_per_tok

    def fuse(self) -> None:
        """(Gate and up are one matrix already.)"""

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [T, E] -> (weights [T, k], experts [T, k]): the top k logits, softmaxed in their dtype."""
        top, index = torch.topk(logits, self.top_k, dim=-1)
        return torch.softmax(top, dim=-1), index

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        weights, index = self.route(self.router(x))
        out = torch.zeros_like(x)
        for e, rows, slots in by_expert(index, len(self.experts)):
            y = self.experts[e](x[rows]) * weights[rows, slots, None]  # [n, D]
            out.index_add_(0, rows, y.to(x.dtype))
        return out


class GptOssDecoderLayer(DecoderLayer):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, layer)
        self.self_attn = SinkAttention(args, layer)
        self.mlp = GptOssMoE(args)
        self.input_layernorm = RMSNormF32(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNormF32(args.hidden_size, args.rms_norm_eps)


class StageModel(LlamaStageModel):
    """Layers ``start:end`` of gpt-oss (see the module's doc)."""

    args: ModelArgs

    def __init__(self, args: ModelArgs, start: int, end: int):
        super().__init__(args, start, end)
        if self.last:
            self.norm = RMSNormF32(args.hidden_size, args.rms_norm_eps)

    def decoder_layer(self, args: ModelArgs, index: int) -> nn.Module:
        return GptOssDecoderLayer(args, index)

    @property
    def fused(self) -> bool:
        return False  # the fused kernels have no attention sinks

    def tensor_names(self) -> dict[str, str]:
        names = super().tensor_names()
        for i in range(len(self.layers)):
            names[f"layers.{i}.self_attn.sinks"] = self.hf_name(f"layers.{i}.self_attn.sinks")
        return names

    def load(self, tensors: dict, dtype: torch.dtype) -> None:
        sinks = {name: tensors.pop(name) for name in [n for n in tensors if n.endswith(".self_attn.sinks")]}
        super().load(tensors, dtype)
        for name, value in sinks.items():
            self.get_submodule(name.rsplit(".", 1)[0]).sinks = nn.Parameter(value, requires_grad=False)

    def held(self) -> dict[int, int]:
        held = super().held()
        for layer in self.layers:
            held[id(layer.self_attn.sinks)] = layer.self_attn.sinks.nbytes
        return held

    def source(self, weights: "TensorSource") -> "TensorSource":
        """The checkpoint's tensors with each expert's weight and bias under a name of its own (``ExpertSource``)."""
        return ExpertSource(weights, self.args.num_experts)


class ExpertSource:
    """A ``TensorSource`` that adds ``...experts.{e}.{gate_up_proj|down_proj}.{weight|bias}`` for the fused
    expert tensors of a safetensors checkpoint: the weight [O, I] as MXFP4 (``*_blocks`` + ``*_scales``, kept as
    stored) or dense (the float tensor's slice, transposed), the bias [O]; each read as one expert's slice."""

    def __init__(self, weights: "TensorSource", num_experts: int):
        from ..torch_backend import SafetensorsWeights

        if not isinstance(weights, SafetensorsWeights):
            raise UnsupportedModel("gpt_oss is served from its Hugging Face checkpoint (safetensors), not a GGUF file")
        self.weights, self.num_experts = weights, num_experts
        self._files: dict[str, Any] = {}  # safetensors file -> its open handle

    def names(self) -> set[str]:
        have = self.weights.names()
        names = set(have)
        for name in have:
            fused = re.match(r"(.+\.experts)\.(gate_up_proj|down_proj)(_blocks)?$", name)
            if fused:
                prefix, proj = fused.group(1), fused.group(2)
                names.update(f"{prefix}.{e}.{proj}.{kind}" for e in range(self.num_experts) for kind in ("weight", "bias")
                             if kind == "weight" or f"{prefix}.{proj}_bias" in have)
        return names

    def get(self, name: str, dtype: torch.dtype):
        found = _EXPERT.match(name)
        if not found:
            return self.weights.get(name, dtype)
        prefix, e, proj, kind = found.group(1), int(found.group(2)), found.group(3), found.group(4)
        if kind == "bias":
            return self._slice(f"{prefix}.{proj}_bias", e).to(dtype)  # [O]
        if f"{prefix}.{proj}_blocks" in self.weights.names():
            return MXFP4Matrix(self._slice(f"{prefix}.{proj}_blocks", e), self._slice(f"{prefix}.{proj}_scales", e))
        return self._slice(f"{prefix}.{proj}", e).T.contiguous()  # [I, O] (x @ W) -> [O, I]

    def _slice(self, name: str, expert: int) -> torch.Tensor:
        """Expert ``expert`` of a fused tensor [E, ...]: only its bytes are read."""
        file = self.weights.files[name]
        if file not in self._files:
            self._files[file] = safe_open(self.weights.path / file, framework="pt", device="cpu")
        part = self._files[file].get_slice(name)
        if part.get_shape()[0] != self.num_experts:
            raise UnsupportedModel(f"{name} holds {part.get_shape()[0]} experts; the config says {self.num_experts}")
        return part[expert]
