"""Llama-family decoder (Llama, Mistral, SmolLM, ...) cut to a layer range, with a per-request KV cache.

Module names inside a layer match transformers' so checkpoints load by renaming
``model.layers.{i}`` to ``layers.{i - start}``. Rows of many requests share one forward: every
projection runs on all rows at once; attention runs per request over its own cache.

Each weight is held once, as loaded (``torch_backend.WeightFormat``): projections as a
``kernels.Projection`` (bf16/fp16 ``Matrix`` or ``QuantMatrix`` blocks) or a dense float tensor; the
q/k/v and gate/up projections stacked into one after loading (the parts dropped); a tied embedding
and head one object on a stage that holds both.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from parallax.broker.errors import UnsupportedModel

from .. import kernels
from . import FULL, SLIDING, check_layer_types
from ..kv import Decode, KVCache, Rows
from ..quant import QuantMatrix

if TYPE_CHECKING:
    from ..torch_backend import TensorSource


ONE_WINDOW = ("mistral", "mixtral", "qwen3_moe")  # transformers slides every layer of these (no layer_types)


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # Qwen2: bias on q/k/v only
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k
    sliding_window: int | None = None  # keys a sliding layer's query sees, its own included (None: no window)
    use_sliding_window: bool = True  # Qwen's switch for sliding_window (off by default there)
    layer_types: tuple[str, ...] | None = None  # per layer; None: every layer slides when there is a window

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known and v is not None})

    def __post_init__(self) -> None:
        if self.model_type in ONE_WINDOW:
            object.__setattr__(self, "layer_types", None)
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise UnsupportedModel(f"sliding_window must be a positive number of positions; got {self.sliding_window!r}")
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            object.__setattr__(self, "layer_types", types)
            if len(types) != self.num_hidden_layers:
                raise UnsupportedModel(f"layer_types names {len(types)} layers; the model has {self.num_hidden_layers}")
            check_layer_types(types)

    def window(self, layer: int) -> int | None:
        """Keys the query of global layer ``layer`` attends to at most (itself included; transformers'
        sliding-window mask: key j visible from query i when i - window < j <= i), or None: all before it."""
        if self.sliding_window is None or not self.use_sliding_window:
            return None
        if self.layer_types is None or self.layer_types[layer] == SLIDING:
            return self.sliding_window
        return None

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_head(self) -> int:
        """A head's width, and the width RoPE rotates."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def kv_dims(self) -> tuple[int, int, int]:
        """What the KV cache holds per position and layer: (heads, key width, value width)."""
        return self.kv_heads, self.dim_head, self.dim_head

    def keeps_float32(self, hf_name: str) -> bool:
        """Whether the checkpoint tensor ``hf_name`` is held in float32 whatever the serving dtype."""
        return False

    def quantizable(self, hf_name: str) -> bool:
        """Whether ``--quantize`` turns the checkpoint matrix ``hf_name`` into blocks (else: held as stored)."""
        return True


@dataclass(frozen=True)
class QwenWindows(ModelArgs):
    """Qwen2/Qwen3's sliding windows: only with ``use_sliding_window``; without ``layer_types`` the layers from
    ``max_window_layers`` on slide (as transformers' Qwen2Config derives them)."""

    use_sliding_window: bool = False
    max_window_layers: int = 28

    def __post_init__(self) -> None:
        if self.layer_types is None and self.use_sliding_window and self.sliding_window is not None:
            types = tuple(SLIDING if i >= self.max_window_layers else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        super().__post_init__()


Weight = Union[torch.Tensor, "kernels.Projection"]  # a dense float weight (F.linear) or a Projection
HALF = (torch.bfloat16, torch.float16)
FUSED_MODES = {torch.bfloat16: kernels.BF16, torch.float32: kernels.F32}  # activations -> fused_layer's mode


class Linear(nn.Module):
    """y = x W^T + b with W held once, as loaded (``load``): a ``kernels.Projection`` on CPU (a bf16/fp16
    ``kernels.Matrix`` or a ``QuantMatrix``, its bias inside it), whose ``matmul`` picks the kernel; or a
    dense float tensor for ``F.linear`` (float32 weights, CUDA). No float32 or transposed copy is kept."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bias
        self.weight: Weight | None = None  # plain attributes, not parameters
        self.bias: torch.Tensor | None = None

    def load(self, weight: Weight, bias: torch.Tensor | None) -> None:
        """weight: [O, I] as ``torch_backend`` converted it (dense tensor or QuantMatrix); bias: [O]."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise UnsupportedModel(f"weight of shape {tuple(weight.shape)} where the config needs "
                                   f"{(self.out_features, self.in_features)}")
        if isinstance(weight, QuantMatrix):
            self.weight = weight if bias is None else QuantMatrix(weight.qtype, weight.shape, weight.blocks, bias)
        elif weight.device.type == "cpu" and weight.dtype in HALF:
            self.weight = kernels.Matrix(weight, bias)
        else:
            self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, I] -> [T, O] in x's dtype
        if isinstance(self.weight, torch.Tensor):
            return F.linear(x, self.weight, self.bias)
        return self.weight.matmul(x)

    @property
    def nbytes(self) -> int:
        """Bytes held (weight + bias)."""
        if isinstance(self.weight, torch.Tensor):
            return self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes)
        return self.weight.nbytes


class Embedding(nn.Module, kernels.RowTable):
    """Token ids -> rows of the table, in the activation dtype. The table as loaded: a dense tensor, a
    ``QuantMatrix`` (``take_rows`` decodes only the rows asked for) or, tied to the head of a stage that
    is first and last, the head's own ``kernels.Matrix`` (one object serves both)."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.num, self.dim = num, dim
        self.weight: Weight | None = None
        self.dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, D]
        w = self.weight
        if isinstance(w, QuantMatrix):
            return w.take_rows(ids).to(self.dtype)
        table = w if isinstance(w, torch.Tensor) else w.weight  # a tied kernels.Matrix: its dense weight
        return F.embedding(ids, table).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalized in float32, scaled in the input dtype, like the reference implementation
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def fuse(parts: list[Linear]) -> Linear:
    """One Linear over the stacked weights of ``parts`` (one GEMV instead of several: fewer ops and
    one pass over memory). The parts are not kept: the caller drops them."""
    fused = Linear(parts[0].in_features, sum(p.out_features for p in parts), parts[0].has_bias)
    if isinstance(parts[0].weight, torch.Tensor):
        bias = torch.cat([p.bias for p in parts]) if parts[0].bias is not None else None
        fused.weight, fused.bias = torch.cat([p.weight for p in parts]), bias
    else:
        fused.weight = kernels.stack([p.weight for p in parts])
    for p in parts:
        p.weight = p.bias = None
    return fused


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, hd]; cos, sin: [T, 1, hd] with sin's first half negated, so that
    rotate_half(x) * sin == roll(x, hd/2) * sin (same values, two ops fewer)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer  # index inside this stage (the KV cache's layer slot)
        self.heads, self.kv_heads, self.hd = args.num_attention_heads, args.kv_heads, args.dim_head
        qkv_bias = args.attention_bias or args.qkv_bias
        self.q_proj = Linear(args.hidden_size, self.heads * self.hd, bias=qkv_bias)
        self.k_proj = Linear(args.hidden_size, self.kv_heads * self.hd, bias=qkv_bias)
        self.v_proj = Linear(args.hidden_size, self.kv_heads * self.hd, bias=qkv_bias)
        self.o_proj = Linear(self.heads * self.hd, args.hidden_size, bias=args.attention_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(self.hd, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, args.rms_norm_eps)
        self.qk_norm = args.qk_norm
        self.gqa = self.heads != self.kv_heads
        self.window: int | None = None  # sliding window of this layer (``StageModel`` sets it: it knows the global index)

    def fuse(self) -> None:
        """After loading: q, k and v projections run as one; the three parts are dropped."""
        self.qkv_proj = fuse([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], rows: Rows, kv: KVCache) -> torch.Tensor:
        T, H, KV = x.shape[0], self.heads, self.kv_heads  # x: [T, D]
        qkv = self.qkv_proj(x).view(T, H + 2 * KV, self.hd)
        qk, v = qkv[:, : H + KV], qkv[:, H + KV :]
        if self.qk_norm:
            qk = torch.cat((self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])), 1)
        qk = apply_rope(qk, *rope)  # [T, H + KV, hd]
        q, k = qk[:, :H], qk[:, H:]
        rows = rows.group(kv.group_of[self.layer])  # as this layer's KV group addresses them
        kv.write(self.layer, rows.write_slots, k, v)
        if not rows.prefills:  # decode only: the rows are the decoding requests, in order
            return self.o_proj(self._decode(q, rows.decode, kv).view(T, self.heads * self.hd))
        out = torch.empty_like(q)  # [T, H, hd]
        if rows.decode is not None:
            out[rows.decode.rows] = self._decode(q[rows.decode.rows], rows.decode, kv)
        for p in rows.prefills:
            keys, values = (k[p.rows], v[p.rows]) if p.read_slots is None else kv.read(self.layer, p.read_slots)
            out[p.rows] = self._prefill(q[p.rows], keys, values, p.pos)
        return self.o_proj(out.view(T, self.heads * self.hd))

    def _decode(self, q: torch.Tensor, d: Decode, kv: KVCache) -> torch.Tensor:
        B = q.shape[0]  # q: [B, H, hd]
        keys, values, mask = self._decode_keys(d, kv)  # [B, KV, L, hd] x2, [B, 1, 1, L] or None
        # the G = H / KV query heads of a KV head attend as G query rows: one SDPA unit per KV head
        # (4x faster on CPU than enable_gqa, which runs one unit per query head)
        o = F.scaled_dot_product_attention(q.view(B, self.kv_heads, -1, self.hd), keys, values, attn_mask=mask)
        return o.reshape(B, self.heads, self.hd)  # [B, KV, G, hd] -> [B, H, hd]

    def _decode_keys(self, d: Decode, kv: KVCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The keys and values the decoding rows attend to, [B, KV, L, hd] each, and the mask of the visible ones
        ([B, 1, 1, L] bool, None: all). With a sliding window only the blocks from the earliest window start of
        the batch on are read, and each row sees its own last ``window`` keys."""
        if self.window is None:
            keys, values = kv.read_blocks(self.layer, d.tables)  # [B, nb * bs, KV, hd]
            return keys[:, : d.length].transpose(1, 2), values[:, : d.length].transpose(1, 2), d.mask
        bs = kv.block_size
        first = max(0, int(d.lengths.min()) - self.window) // bs  # the first block any row still sees
        keys, values = kv.read_blocks(self.layer, d.tables[:, first:])
        n = d.length - first * bs
        cols = first * bs + torch.arange(n, device=d.lengths.device)  # [L] positions of the keys read
        mask = (cols[None, :] < d.lengths[:, None]) & (cols[None, :] >= d.lengths[:, None] - self.window)  # [B, L]
        return keys[:, :n].transpose(1, 2), values[:, :n].transpose(1, 2), mask[:, None, None, :]

    def _prefill_mask(self, pos: int, n: int, device: torch.device) -> torch.Tensor:
        """[n, pos + n] bool: query row i (position pos + i) sees key j when j <= pos + i (and, in a sliding
        layer, j > pos + i - window)."""
        cols, at = torch.arange(pos + n, device=device)[None, :], (pos + torch.arange(n, device=device))[:, None]
        mask = cols <= at  # causal, cache visible
        return mask if self.window is None else mask & (cols > at - self.window)

    def _prefill(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: int) -> torch.Tensor:
        n = q.shape[0]  # q: [n, H, hd]; keys/values: [pos+n, KV, hd]
        mask = self._prefill_mask(pos, n, q.device)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask, enable_gqa=self.gqa
        )  # [H, n, hd]
        return o.transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)
        self.act = ACT2FN[args.hidden_act]

    def fuse(self) -> None:
        self.gate_up_proj = fuse([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, -1)  # [T, 2I] -> 2 x [T, I]
        return self.down_proj(self.act(gate).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def weights(self) -> kernels.LayerWeights:
        """This layer's tensors as ``kernels.fused_layer`` reads them (views; made once)."""
        if "_arrays" not in self.__dict__:
            attn, mlp = self.self_attn, self.mlp
            self.__dict__["_arrays"] = kernels.LayerWeights(
                _f32(self.input_layernorm.weight), attn.qkv_proj.weight, attn.o_proj.weight,
                _f32(self.post_attention_layernorm.weight), mlp.gate_up_proj.weight, mlp.down_proj.weight,
                self.input_layernorm.eps,
            )
        return self.__dict__["_arrays"]

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], rows: Rows, kv: KVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, rows, kv)
        return x + self.mlp(self.post_attention_layernorm(x))

    def run_fused(self, x: np.ndarray, batch: kernels.RowBatch, k_cache: np.ndarray, v_cache: np.ndarray) -> None:
        """The fused path: x [T, D] float32 updated in place by ``kernels.fused_layer``."""
        attn = self.self_attn
        kernels.fused_layer(x, self.weights(), batch, attn.heads, attn.kv_heads, attn.hd, k_cache, v_cache, attn.window or 0)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


class StageModel(nn.Module):
    """Layers ``start:end`` of the model; the first stage embeds, the last one norms and projects."""

    def __init__(self, args: ModelArgs, start: int, end: int):
        super().__init__()
        self.args, self.start, self.end = args, start, end
        self.first, self.last = start == 0, end == args.num_hidden_layers
        if self.first:
            self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(self.decoder_layer(args, i) for i in range(end - start))
        for i, layer in enumerate(self.layers):
            layer.self_attn.window = args.window(start + i)
        if self.last:
            self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.empty(args.dim_head // 2), persistent=False)
        self.attention_scaling = 1.0
        self.dtype = torch.float32  # activations (and KV); set by ``load``
        self.kernel_picks: dict[str, str] = {}  # which kernel each projection runs (``kernels.tune`` at load)

    def decoder_layer(self, args: ModelArgs, index: int) -> nn.Module:
        """The layer at local ``index`` (global ``self.start + index``); other architectures override."""
        return DecoderLayer(args, index)

    def source(self, weights: "TensorSource") -> "TensorSource":
        """The checkpoint's tensors as ``tensor_names`` names them (an architecture whose checkpoints fuse
        tensors this model holds apart, e.g. gpt-oss's experts, wraps them)."""
        return weights

    def tensor_names(self) -> dict[str, str]:
        """Every tensor this stage loads: our name -> the checkpoint's. A tied head is listed under
        ``lm_head.weight`` too; the loader reads it from the embedding's tensor."""
        names = {}
        for prefix, module in self.named_modules():
            if isinstance(module, (Linear, Embedding, RMSNorm)):
                names[f"{prefix}.weight"] = self.hf_name(f"{prefix}.weight")
            if isinstance(module, Linear) and module.has_bias:
                names[f"{prefix}.bias"] = self.hf_name(f"{prefix}.bias")
        return names

    def load(self, tensors: dict[str, Weight], dtype: torch.dtype) -> None:
        """Take the loaded tensors (``tensor_names``; projections converted by the loader, vectors in
        ``dtype``), each held once: a tied head given the embedding's own object shares it."""
        self.dtype = dtype
        modules = dict(self.named_modules())
        for name, value in tensors.items():
            prefix, kind = name.rsplit(".", 1)
            module = modules[prefix]
            if isinstance(module, RMSNorm):
                module.weight = nn.Parameter(value, requires_grad=False)
            elif isinstance(module, Embedding):
                module.weight, module.dtype = value, dtype
            elif kind == "weight":
                module.load(value, tensors.get(f"{prefix}.bias"))
        if self.first and self.last and tensors.get("lm_head.weight") is tensors["embed_tokens.weight"]:
            self.embed_tokens.weight = self.lm_head.weight  # one object for both (a Matrix: same tensor)

    def held(self) -> dict[int, int]:
        """Bytes of every weight this stage holds, once per object: id -> nbytes (norms included)."""
        held = {}
        for module in self.modules():
            if isinstance(module, (Linear, Embedding)) and module.weight is not None:
                held[id(module.weight)] = module.nbytes
            elif isinstance(module, RMSNorm):
                held[id(module.weight)] = module.weight.nbytes
        return held

    @property
    def weight_bytes(self) -> int:
        return sum(self.held().values())

    def forward(self, x: torch.Tensor, rows: Rows, kv: KVCache) -> torch.Tensor:
        """x: token ids [T] (first stage) or hidden [T, D]. Returns hidden [T, D], or logits
        [S, V] of the rows in ``rows.sample_rows`` on the last stage."""
        h = self.embed_tokens(x) if self.first else x
        if self.fused:
            return self._forward_fused(h, rows, kv)
        rope = self._rope(rows.positions, h.dtype)
        for layer in self.layers:
            h = layer(h, rope, rows, kv)
        if not self.last:
            return h
        return self.lm_head(self.norm(h[rows.sample_rows]))

    @property
    def fused(self) -> bool:
        """bf16 or float32 activations on CPU with ``kernels.Projection`` weights (bf16/fp16 ``Matrix``,
        ``QuantMatrix``) in a Llama-family layer run through ``kernels.fused_layer``: a few numba calls per
        layer, every row computed on its own (batch-invariant), prompt rows and generated tokens apart;
        rounded to bf16 after every op as torch does in bf16, or float32 throughout."""
        a, w = self.args, self.layers[0].mlp.down_proj.weight
        projection = not isinstance(w, torch.Tensor)  # dense tensors: the F.linear path (float32, CUDA)
        return projection and self.dtype in FUSED_MODES and not a.qk_norm and a.hidden_act == "silu"

    @property
    def decode_group(self) -> int:
        """Generated-token rows one fused step takes (0: no fused path)."""
        return kernels.MAX_ROWS if self.fused else 0

    def _forward_fused(self, h: torch.Tensor, rows: Rows, kv: KVCache) -> torch.Tensor:
        tables = rows.row_tables()  # [T, nb]
        mode = FUSED_MODES[self.dtype]
        batch = kernels.RowBatch.build(rows.positions.numpy(), self.inv_freq.float().numpy(), self.attention_scaling,
                                       rows.write_slots.numpy(), tables, kv.block_size, rows.prompt, mode)
        batches = [batch] + [replace(batch, write_slots=r.write_slots.numpy(), tables=r.row_tables()) for r in rows.more]
        k_cache, v_cache = kv.bits()  # each layer's [slots, KV, hd]
        x = h.float().numpy().copy()  # [T, D] float32 (bf16 values in BF16 mode), updated layer by layer
        stage = self._int8_stage(batch.prompt) if len(batches) == 1 else None  # one KV group: one batch
        if stage is not None:
            attn = self.layers[0].self_attn
            kernels.fused_stage(x, stage, batch, attn.heads, attn.kv_heads, attn.hd, k_cache, v_cache)
        else:
            for i, layer in enumerate(self.layers):
                layer.run_fused(x, batches[kv.group_of[i]], k_cache[i], v_cache[i])
        if not self.last:
            return torch.from_numpy(x).to(h.dtype)
        normed = kernels.norm_rows(x[rows.sample_rows.numpy()], _f32(self.norm.weight), self.norm.eps, mode)  # [S, D]
        return torch.from_numpy(self.lm_head.weight.decode(normed)).to(h.dtype)  # [S, V]

    def _int8_stage(self, prompt: bool) -> list[tuple] | None:
        """``kernels.int8_stage`` of this stage's layers for a row kind (made once; None: layer by layer)."""
        made = self.__dict__.setdefault("_int8_stages", {})
        if prompt not in made:
            plain = all(type(layer).run_fused is DecoderLayer.run_fused for layer in self.layers)
            made[prompt] = kernels.int8_stage([(layer.weights(), layer.self_attn.window or 0) for layer in self.layers],
                                              prompt) if plain else None
        return made[prompt]

    def warm_up(self) -> None:
        """Compile the fused path for this model's weights (or load it from numba's cache) while the stage loads,
        not at its first request (SmolLM2 Q4_1 on a cold cache: ~4 s a stage): a zero row of each row kind
        through the first layer (through every layer where ``kernels.fused_stage`` runs them: their formats may
        differ), into a scratch KV cache of one slot; the embedding and the head too."""
        mode, (kv_heads, k_dim, v_dim), n = FUSED_MODES[self.dtype], self.args.kv_dims, len(self.layers)
        k_cache, v_cache = np.zeros((n, 1, kv_heads, k_dim), mode.dtype), np.zeros((n, 1, kv_heads, v_dim), mode.dtype)
        x = np.zeros((1, self.args.hidden_size), np.float32)  # [1, D]
        for prompt in (False, True):
            batch = kernels.RowBatch.build(np.zeros(1, np.int64), self.inv_freq.float().numpy(), 1.0, np.zeros(1, np.int64),
                                           np.zeros((1, 1), np.int64), 1, prompt, mode)
            if (stage := self._int8_stage(prompt)) is not None:
                attn = self.layers[0].self_attn
                kernels.fused_stage(x, stage, batch, attn.heads, attn.kv_heads, attn.hd, k_cache, v_cache)
            else:
                self.layers[0].run_fused(x, batch, k_cache[0], v_cache[0])
        if self.first:
            self.embed_tokens(torch.zeros(1, dtype=torch.long))
        if self.last:
            self.lm_head.weight.decode(x)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :].float()  # [T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        sin[:, : sin.shape[1] // 2].neg_()  # see apply_rope
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]  # [T, 1, hd]

    def fuse(self) -> None:
        """Call once the weights are loaded: stacks each layer's projections (see ``fuse``)."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def hf_name(self, name: str) -> str:
        """Our parameter name -> the checkpoint's (global layer index)."""
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            return f"model.layers.{int(i) + self.start}.{rest}"
        return name if name.startswith("lm_head") else f"model.{name}"
