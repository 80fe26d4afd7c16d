"""Mixture-of-experts decoders (Qwen3-MoE, Mixtral): the Llama-family layer whose MLP is, in the sparse
layers, a router and ``E`` experts (each a gated MLP of its own width) of which every row uses ``k``.

Routing as transformers does it: softmax over the router logits in float32, the top ``k``, renormalised
to sum to one where the architecture says so (Qwen3-MoE's ``norm_topk_prob``; Mixtral always, which
equals a softmax over the top-k logits). Rows are grouped by expert: each expert runs once over the rows
routed to it, so a step reads only the experts its rows picked (active parameters, not all of them).
Every expert is a ``llama.MLP``: its gate and up projections stacked into one after loading, weights
held as loaded (``kernels.Projection`` on CPU, quantized by ``--quantize`` like any other matrix), except
experts whose blocks are pages of a memory-mapped GGUF (``gguf_weights``): their gate and up stay apart
(``kernels.Stacked``), so that nothing is copied. The router is never quantized at load (``quantizable``:
it is small, and which experts a row uses should not move with quantization); on the fused path a dense
router is a ``kernels.Matrix`` as well (float32 included: ``project_router``).

Two paths, as for dense layers. The torch path (dense float weights: float32, CUDA) runs each expert's
projections with ``F.linear`` and accumulates with ``index_add_`` in ascending expert order, as
transformers does. The fused path (CPU, ``kernels.Projection`` weights, bf16 or float32 activations)
runs the layer in numba kernels shared with ``kernels.fused_layer``: every projection by its row kind's
kernel (generated tokens: ``decode``, prompt rows: ``prefill``), each of which reads one row at a time,
so a row's result never depends on the other rows of a step, nor on which of them share its experts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from parallax.broker.errors import UnsupportedModel

from .. import kernels
from ..quant import QuantMatrix
from .llama import FUSED_MODES, MLP, DecoderLayer, Linear, ModelArgs, StageModel, _f32

ROUTER = re.compile(r"\.(mlp|block_sparse_moe)\.(gate|router)\.weight$")  # a router's checkpoint name


@dataclass(frozen=True)
class MoEArgs(ModelArgs):
    num_experts: int = 0  # experts of a sparse layer (Mixtral's and transformers 5's num_local_experts)
    num_experts_per_tok: int = 2  # k: experts each row uses
    moe_intermediate_size: int | None = None  # an expert's width (None: intermediate_size)
    norm_topk_prob: bool = True  # the top-k probabilities renormalised to sum to 1
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and it is not one of these (dense MLP layers)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "MoEArgs":
        config = dict(config)
        if not config.get("num_experts"):
            config["num_experts"] = config.get("num_local_experts")
        return super().from_dict(config)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise UnsupportedModel(f"a mixture-of-experts config needs num_experts >= 1; got {self.num_experts!r}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise UnsupportedModel(f"num_experts_per_tok must be in 1..{self.num_experts}; got {self.num_experts_per_tok}")
        if self.decoder_sparse_step < 1:
            raise UnsupportedModel(f"decoder_sparse_step must be >= 1; got {self.decoder_sparse_step}")

    def quantizable(self, hf_name: str) -> bool:
        """Every matrix but the routers (see the module's doc)."""
        return not ROUTER.search(hf_name)

    def sparse(self, layer: int) -> bool:
        """Whether global layer ``layer`` routes to experts (else it has a dense MLP)."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    @property
    def expert_args(self) -> ModelArgs:
        """The arguments an expert (a ``llama.MLP``) is built from: its own width, no bias."""
        return replace(self, intermediate_size=self.moe_intermediate_size or self.intermediate_size, mlp_bias=False)


class SparseMoE(nn.Module):
    """Router (``gate``: [E, D]) and experts; module names as in Qwen3-MoE's checkpoints."""

    def __init__(self, args: MoEArgs):
        super().__init__()
        self.gate = Linear(args.hidden_size, args.num_experts, bias=False)
        expert = args.expert_args
        self.experts = nn.ModuleList(MLP(expert) for _ in range(args.num_experts))
        self.top_k, self.norm_topk_prob = args.num_experts_per_tok, args.norm_topk_prob
        self.width = expert.intermediate_size

    def fuse(self) -> None:
        for expert in self.experts:
            if _mapped(expert.gate_proj.weight) or _mapped(expert.up_proj.weight):
                _keep_apart(expert)
            else:
                expert.fuse()

    def project_router(self) -> None:
        """For the fused path: a dense router (a float32 one; bf16/fp16 ones are Matrix already) becomes a
        ``kernels.Matrix`` over the same tensor."""
        if isinstance(self.gate.weight, torch.Tensor):
            self.gate.weight = kernels.Matrix(self.gate.weight, None)

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [T, E] -> (weights [T, k] float32, experts [T, k] long), as transformers computes them."""
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        top, index = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return top, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the torch path: [T, D] -> [T, D] in x's dtype
        return self.routed(x, *self.route(self.gate(x)))

    def routed(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The experts' weighted sum: x [T, D], weights [T, k], index [T, k] -> [T, D] in x's dtype; each
        expert once over the rows routed to it, accumulated in ascending expert order."""
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e, rows, slots in by_expert(index, len(self.experts)):
            y = self.experts[e](x[rows]) * weights[rows, slots, None]  # [n, D]
            out.index_add_(0, rows, y)
        return out


def _mapped(weight: Any) -> bool:
    """Whether a weight is GGUF blocks in a memory-mapped file (``gguf_weights``: an expert's slice)."""
    return isinstance(weight, QuantMatrix) and isinstance(weight.blocks, np.memmap)


def _keep_apart(expert: MLP) -> None:
    """``MLP.fuse`` without the copy: gate and up run as one ``kernels.Stacked`` projection over the two
    matrices as they are (outputs side by side, as the stacked matrix would give them)."""
    gate_up = Linear(expert.gate_proj.in_features, 2 * expert.gate_proj.out_features, bias=False)
    gate_up.weight = kernels.Stacked([expert.gate_proj.weight, expert.up_proj.weight])
    expert.gate_up_proj = gate_up
    del expert.gate_proj, expert.up_proj


def by_expert(index: torch.Tensor, num_experts: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """index [T, k] (each row's experts) -> (expert, rows [n], slots [n]) for every expert some row picked, in
    ascending expert order; rows ascending (``slots``: where in its top k the row picked the expert)."""
    k = index.shape[1]
    flat = index.flatten()  # [T * k]: position = row * k + slot
    order = torch.argsort(flat, stable=True)
    groups, at = [], 0
    for e, n in enumerate(torch.bincount(flat, minlength=num_experts).tolist()):
        if n:
            pos = order[at : at + n]
            groups.append((e, pos // k, pos % k))
            at += n
    return groups


@dataclass(frozen=True)
class _Norms:
    """A layer's norm weights as the fused kernels read them: float32 (bf16 values in a bf16 stage)."""

    ln1: np.ndarray  # [D]
    ln2: np.ndarray  # [D]
    q: np.ndarray | None  # [hd] (qk_norm)
    k: np.ndarray | None
    eps: float


class MoEDecoderLayer(DecoderLayer):
    """A Llama-family layer (with Qwen3's qk_norm where the config says) whose MLP is a ``SparseMoE`` in the
    sparse layers."""

    def __init__(self, args: MoEArgs, layer: int, sparse: bool):
        super().__init__(args, layer)
        if sparse:
            self.mlp = SparseMoE(args)

    def norms(self) -> _Norms:
        if "_norms" not in self.__dict__:
            attn = self.self_attn
            q, k = (_f32(attn.q_norm.weight), _f32(attn.k_norm.weight)) if attn.qk_norm else (None, None)
            self.__dict__["_norms"] = _Norms(_f32(self.input_layernorm.weight),
                                             _f32(self.post_attention_layernorm.weight), q, k, self.input_layernorm.eps)
        return self.__dict__["_norms"]

    def run_fused(self, x: np.ndarray, batch: kernels.RowBatch, k_cache: np.ndarray, v_cache: np.ndarray) -> None:
        """x: [T, D] float32 (bf16 values for BF16), updated in place: attention as ``kernels.fused_layer``
        runs it (with qk_norm), then the dense MLP or the routed experts."""
        w, attn = self.norms(), self.self_attn
        weights = kernels.LayerWeights(w.ln1, attn.qkv_proj.weight, attn.o_proj.weight, w.ln2, None, None, w.eps)
        qk = (w.q, w.k) if w.q is not None else None
        normed = kernels.attention_rows(x, weights, batch, attn.heads, attn.kv_heads, attn.hd, k_cache, v_cache, qk,
                                        attn.window or 0)
        mlp = _experts_rows(self.mlp, normed, batch) if isinstance(self.mlp, SparseMoE) else _mlp_rows(self.mlp, normed, batch)
        kernels.add_rows(x, mlp, batch.mode)


def _mlp_rows(mlp: MLP, x: np.ndarray, batch: kernels.RowBatch) -> np.ndarray:
    """A gated MLP over rows x [n, D] float32 -> [n, D] (rounded to bf16 for BF16), as ``kernels.fused_layer``."""
    return kernels.mlp_rows(mlp.gate_up_proj.weight, mlp.down_proj.weight, x, batch)


def _experts_rows(moe: SparseMoE, x: np.ndarray, batch: kernels.RowBatch) -> np.ndarray:
    """The routed experts over rows x [T, D] float32 -> [T, D]: each expert once over its rows, every
    product and sum rounded as the torch path rounds them in bf16 (weights in bf16, bf16 accumulation)."""
    weights, index = moe.route(torch.from_numpy(kernels.project_rows(moe.gate.weight, x, batch)))  # [T, k] each
    weights = kernels.keep_rows(weights.numpy(), batch.mode)
    out = np.zeros_like(x)
    for e, rows, slots in by_expert(index, len(moe.experts)):
        rows_np = rows.numpy()
        y = _mlp_rows(moe.experts[e], x[rows_np], batch) * weights[rows_np, slots.numpy(), None]  # [n, D]
        out[rows_np] = kernels.keep_rows(out[rows_np] + kernels.keep_rows(y, batch.mode), batch.mode)
    return out


class MoEStageModel(StageModel):
    """Layers ``start:end`` of a mixture-of-experts model."""

    args: MoEArgs

    def decoder_layer(self, args: MoEArgs, index: int) -> nn.Module:
        return MoEDecoderLayer(args, index, args.sparse(self.start + index))

    def fuse(self) -> None:
        super().fuse()
        if self.fused:
            for layer in self.layers:
                if isinstance(layer.mlp, SparseMoE):
                    layer.mlp.project_router()

    @property
    def fused(self) -> bool:
        """On CPU with ``kernels.Projection`` weights and bf16/float32 activations (see the module's doc)."""
        projection = not isinstance(self.layers[0].self_attn.o_proj.weight, torch.Tensor)
        return projection and self.dtype in FUSED_MODES and self.args.hidden_act == "silu"
