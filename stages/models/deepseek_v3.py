"""DeepSeek-V3 (``deepseek_v3``; DeepSeek-V3/R1, and the same layout under other names): multi-head latent
attention (MLA) with its compressed KV cache, and a mixture of experts with shared experts, sigmoid
group-limited routing and ``first_k_dense_replace`` dense layers first. The math is transformers'
``modeling_deepseek_v3``.

MLA: queries through ``q_a_proj -> q_a_layernorm -> q_b_proj`` (or one ``q_proj`` when ``q_lora_rank`` is
None); keys and values from one latent per position, ``kv_a_proj_with_mqa`` -> (``kv_lora_rank`` values,
normed by ``kv_a_layernorm``) + (``qk_rope_head_dim`` values: the rope key every head shares). The KV cache
holds that latent and the rope'd shared key, ``kv_lora_rank + qk_rope_head_dim`` values per position and
layer (the ``k`` pool with one head; the ``v`` pool is zero-wide), not per-head keys and values.
Attention decompresses the cached latents with ``kv_b_proj`` into per-head keys (``qk_nope_head_dim``) and
values (``v_head_dim``) at every step (no absorbed matrices). RoPE rotates the last ``qk_rope_head_dim``
values of each query head and the shared key, in DeepSeek's interleaved pair layout when
``rope_interleave``; the softmax scale carries yarn's ``mscale_all_dim`` factor as transformers applies it.

Routing as ``DeepseekV3TopkRouter``: the router runs in float32 (its weight and ``e_score_correction_bias``
are held in float32 whatever the serving dtype, as transformers keeps them), sigmoid scores; the bias is
added for choosing only; the experts are chosen among the ``topk_group`` of ``n_group`` groups with the best
two-expert sums; the weights are the unbiased scores of the chosen experts, renormalised when
``norm_topk_prob``, times ``routed_scaling_factor``. Routed experts grouped by expert (``moe``), plus the
shared experts (one MLP of ``moe_intermediate_size * n_shared_experts``) on every row.

Torch path only: on CPU too (``fused`` is False: no numba kernels for MLA), projections by their
``kernels.Projection`` where the weights are bf16/fp16 or quantized, ``F.linear`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

from parallax.broker.errors import UnsupportedModel

from ..kv import Decode, KVPool, Rows
from .llama import MLP, Linear, RMSNorm, apply_rope
from .moe import MoEArgs, MoEStageModel, SparseMoE

LATENT_NORM_EPS = 1e-6  # q_a_layernorm's and kv_a_layernorm's epsilon (transformers' default; not rms_norm_eps)
ROPE_TYPES = ("default", "yarn")
_FLOAT32 = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")  # router tensors held in float32


@dataclass(frozen=True)
class ModelArgs(MoEArgs):
    q_lora_rank: int | None = None  # None: queries by one q_proj
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    n_shared_experts: int = 1
    routed_scaling_factor: float = 2.5
    n_group: int = 8
    topk_group: int = 4
    first_k_dense_replace: int = 3
    rope_interleave: bool = True
    rope_parameters: dict | None = None  # rope_type, factor, mscale_all_dim, ... (legacy rope_scaling accepted)
    quantization_config: dict | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        config = dict(config)
        config["num_experts"] = config.get("n_routed_experts")
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope.setdefault("rope_type", rope.get("type", "default"))
        config["rope_parameters"] = rope
        args = super().from_dict(config)
        return replace(args, q_lora_rank=config.get("q_lora_rank"))  # None is meaningful here: no query compression

    def __post_init__(self) -> None:
        super().__post_init__()
        E, groups, heads = self.num_experts, self.n_group, self.num_attention_heads
        if self.num_key_value_heads not in (None, heads):
            raise UnsupportedModel(f"deepseek_v3: MLA needs num_key_value_heads == num_attention_heads ({heads}); "
                                   f"got {self.num_key_value_heads}")
        if groups < 1 or E % groups or E // groups < 2:
            raise UnsupportedModel(f"deepseek_v3: n_group {groups} must divide n_routed_experts {E} into groups of "
                                   "at least 2 experts")
        if not 1 <= self.topk_group <= groups or self.num_experts_per_tok > self.topk_group * (E // groups):
            raise UnsupportedModel(f"deepseek_v3: topk_group {self.topk_group} of n_group {groups} cannot give "
                                   f"num_experts_per_tok {self.num_experts_per_tok} experts")
        if self.n_shared_experts < 1:
            raise UnsupportedModel(f"deepseek_v3: n_shared_experts must be >= 1; got {self.n_shared_experts}")
        if self.rope_type not in ROPE_TYPES:
            raise UnsupportedModel(f"deepseek_v3: rope_type {self.rope_type!r} is not supported "
                                   f"(have: {', '.join(ROPE_TYPES)})")
        method = (self.quantization_config or {}).get("quant_method")
        if method is not None:
            raise UnsupportedModel(f"deepseek_v3: {method} checkpoints are not supported; serve a bf16 or float32 "
                                   "conversion (--quantize quantizes it at load)")

    def sparse(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def rope_type(self) -> str:
        return (self.rope_parameters or {}).get("rope_type", "default")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def dim_head(self) -> int:
        return self.qk_rope_head_dim  # what RoPE rotates (the stage's inv_freq)

    @property
    def kv_dims(self) -> tuple[int, int, int]:
        return 1, self.kv_lora_rank + self.qk_rope_head_dim, 0  # the latent and the shared rope key, in k

    @property
    def softmax_scale(self) -> float:
        return yarn_apply_mscale(self.rope_parameters or {}, self.qk_head_dim ** -0.5)

    @property
    def shared_args(self) -> MoEArgs:
        """The shared experts as one gated MLP."""
        return replace(self, intermediate_size=self.moe_intermediate_size * self.n_shared_experts, mlp_bias=False)

    def keeps_float32(self, hf_name: str) -> bool:
        return hf_name.endswith(_FLOAT32)


class MLAttention(nn.Module):
    """Multi-head latent attention over the compressed cache (see the module's doc)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer  # index inside this stage (the KV cache's layer slot)
        D, H = args.hidden_size, args.num_attention_heads
        self.heads, self.nope, self.rot, self.v_dim = H, args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.rank, self.qk = args.kv_lora_rank, args.qk_head_dim
        self.compressed_q = args.q_lora_rank is not None
        if self.compressed_q:
            self.q_a_proj = Linear(D, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(args.q_lora_rank, H * self.qk, bias=False)
        else:
            self.q_proj = Linear(D, H * self.qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(D, self.rank + self.rot, bias=args.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(H * self.v_dim, D, bias=args.attention_bias)
        self.scale, self.interleaved = args.softmax_scale, args.rope_interleave

    def fuse(self) -> None:
        """Nothing stacked: the projections take different inputs (or differ in bias)."""

    def _rope(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [T, h, rot] -> rotated; DeepSeek's interleaved pairs (x0, x1), (x2, x3), ... first laid out as
        (x0, x2, ..., x1, x3, ...), as transformers' ``apply_rotary_pos_emb_interleave`` returns them."""
        if self.interleaved:
            x = torch.cat((x[..., 0::2], x[..., 1::2]), -1)
        return apply_rope(x, *rope)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], rows: Rows, kv: KVPool) -> torch.Tensor:
        T, H = x.shape[0], self.heads  # x: [T, D]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.compressed_q else self.q_proj(x)
        q = q.view(T, H, self.qk)
        q = torch.cat((q[..., : self.nope], self._rope(q[..., self.nope :], rope)), -1)  # [T, H, nope + rot]
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.rank, self.rot], -1)  # [T, rank], [T, rot]
        entry = torch.cat((self.kv_a_layernorm(latent), self._rope(k_rot[:, None], rope)[:, 0]), -1)[:, None]
        kv.write(self.layer, rows.write_slots, entry, entry[..., :0])  # entry: [T, 1, rank + rot]; v: zero-wide
        if not rows.prefills:  # decode only: the rows are the decoding requests, in order
            return self.o_proj(self._decode(q, rows.decode, kv).reshape(T, H * self.v_dim))
        out = q.new_empty(T, H, self.v_dim)
        if rows.decode is not None:
            out[rows.decode.rows] = self._decode(q[rows.decode.rows], rows.decode, kv)
        for p in rows.prefills:
            cached = entry[p.rows] if p.read_slots is None else kv.read(self.layer, p.read_slots)[0]
            out[p.rows] = self._prefill(q[p.rows], cached, p.pos)
        return self.o_proj(out.view(T, H * self.v_dim))

    def _expand(self, cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cached [..., L, 1, rank + rot] -> keys [..., H, L, nope + rot], values [..., H, L, v] (``kv_b_proj``)."""
        latent, k_rot = cached[..., 0, : self.rank], cached[..., 0, self.rank :]  # [..., L, rank], [..., L, rot]
        kv = self.kv_b_proj(latent.reshape(-1, self.rank))  # [... * L, H * (nope + v)]
        kv = kv.view(*latent.shape[:-1], self.heads, -1)  # [..., L, H, nope + v]
        k_nope, values = kv.split([self.nope, self.v_dim], -1)
        keys = torch.cat((k_nope, k_rot[..., None, :].expand(*k_nope.shape[:-1], self.rot)), -1)  # [..., L, H, qk]
        return keys.transpose(-3, -2), values.transpose(-3, -2)

    def _decode(self, q: torch.Tensor, d: Decode, kv: KVPool) -> torch.Tensor:
        cached = kv.read_blocks(self.layer, d.tables)[0][:, : d.length]  # [B, L, 1, rank + rot]
        keys, values = self._expand(cached)  # [B, H, L, qk], [B, H, L, v]
        o = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=d.mask, scale=self.scale)
        return o[:, :, 0]  # [B, H, 1, v] -> [B, H, v]

    def _prefill(self, q: torch.Tensor, cached: torch.Tensor, pos: int) -> torch.Tensor:
        n = q.shape[0]  # q: [n, H, qk]; cached: [pos + n, 1, rank + rot]
        cols = torch.arange(pos + n, device=q.device)
        mask = cols[None, :] <= (pos + torch.arange(n, device=q.device))[:, None]  # causal, cache visible
        keys, values = self._expand(cached)  # [H, pos + n, qk], [H, pos + n, v]
        o = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask, scale=self.scale)
        return o.transpose(0, 1)  # [n, H, v]


class DeepseekMoE(SparseMoE):
    """Router (``gate``: weight [E, D] and ``e_score_correction_bias`` [E], float32), routed experts and the
    shared experts; module names as in the checkpoints."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.shared_experts = MLP(args.shared_args)
        self.e_score_correction_bias: torch.Tensor | None = None  # [E] float32, set by the stage's load
        self.groups, self.top_groups, self.scaling = args.n_group, args.topk_group, args.routed_scaling_factor

    def fuse(self) -> None:
        super().fuse()
        self.shared_experts.fuse()

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [T, E] float32 -> (weights [T, k] float32, experts [T, k] long), as DeepseekV3TopkRouter."""
        T, E = logits.shape
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias  # [T, E]: the bias picks, it does not weigh
        group_scores = choice.view(T, self.groups, -1).topk(2, dim=-1)[0].sum(-1)  # [T, G]
        top_groups = group_scores.topk(self.top_groups, dim=-1, sorted=False)[1]  # [T, topk_group]
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        allowed = allowed[:, :, None].expand(T, self.groups, E // self.groups).reshape(T, E)
        index = choice.masked_fill(~allowed, float("-inf")).topk(self.top_k, dim=-1, sorted=False)[1]  # [T, k]
        weights = scores.gather(1, index)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D] in x's dtype
        logits = F.linear(x.float(), self.gate.weight)  # float32 router (ModelArgs.keeps_float32)
        return self.routed(x, *self.route(logits)) + self.shared_experts(x)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, sparse: bool):
        super().__init__()
        self.self_attn = MLAttention(args, layer)
        self.mlp = DeepseekMoE(args) if sparse else MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], rows: Rows, kv: KVPool) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, rows, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class StageModel(MoEStageModel):
    """Layers ``start:end`` of a DeepSeek-V3 model (the first ``first_k_dense_replace`` dense)."""

    args: ModelArgs

    def decoder_layer(self, args: ModelArgs, index: int) -> nn.Module:
        return DecoderLayer(args, index, args.sparse(self.start + index))

    @property
    def fused(self) -> bool:
        return False  # the torch path everywhere (see the module's doc)

    def _routers(self) -> dict[str, DeepseekMoE]:
        """Our module prefix -> the router-holding MoE of each sparse layer."""
        layers = enumerate(self.layers)
        return {f"layers.{i}.mlp": layer.mlp for i, layer in layers if isinstance(layer.mlp, DeepseekMoE)}

    def tensor_names(self) -> dict[str, str]:
        names = super().tensor_names()
        for prefix in self._routers():
            names[f"{prefix}.gate.e_score_correction_bias"] = self.hf_name(f"{prefix}.gate.e_score_correction_bias")
        return names

    def load(self, tensors: dict[str, Any], dtype: torch.dtype) -> None:
        tensors = dict(tensors)
        for prefix, moe in self._routers().items():
            moe.e_score_correction_bias = tensors.pop(f"{prefix}.gate.e_score_correction_bias")
        super().load(tensors, dtype)

    def held(self) -> dict[int, int]:
        held = super().held()
        for moe in self._routers().values():
            held[id(moe.e_score_correction_bias)] = moe.e_score_correction_bias.nbytes
        return held
