"""Projections as stored and the fused Llama-family layer for CPUs: generated tokens and prompt rows.

A projection (``Projection``: ``Matrix`` for dense bf16/fp16/float32 weights, ``quant.QuantMatrix`` for
GGUF blocks, ``Stacked`` for q/k/v or gate/up of mixed formats) keeps its weight once, as stored: the
kernels read W [O, I] in place (no transposed, float32 or dequantized copy). Each has candidate kernels
(``quant.Tiled``): the numba tile kernel (four weight rows decoded into a small scratch, dotted with
four input rows at a time), the numba GEMV (one weight row, every input row; a bf16 weight widened in the
dot itself), a tile-dequant + torch float32 GEMM, and torch's own F.linear for activations of the
weight's dtype; for GGUF blocks with bf16 activations also torch's int4 kernel (``stages.int4pack``) and the
int8-activation kernel (``stages.int8dot``; a layer whose four projections all picked it runs in one numba
call, ``_layer_int8``; ``fused_stage`` runs a stage whose every layer does with no other Python between them).
``tune`` (``stages.tuning``) times them at stage load and picks one per (shape + format, row kind); the picks
are cached per machine.

Measured on a 2-core AMD EPYC (avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni ...), torch 2.13,
one thread, the machine shared with other jobs (ms per call, the fastest of many, bf16 weight; the old
kernels are this file before issue 9):
  1536x576 prompt rows M=256: tile 5.35 (old ``_gemm_rows`` over a transposed copy: 6.92), torch bf16
  F.linear 2.21 (native bf16 dot products); M=64: tile 1.41, old 1.24, torch 0.68.
  1536x576 M=1: GEMV 0.09 (old 0.08), tile 0.16, torch 0.22; M=16: tile 0.54, GEMV/old 0.62, torch 0.34.
  49152x576 (lm_head) M=1: GEMV 2.8 (old 2.5), torch 6.5; M=16: tile 22.6, old 31.4, torch 11.2.
So on this CPU torch's bf16 F.linear wins from 16 rows on where it is batch-invariant, the numba GEMV
at one row: which is why the choice is measured per machine and shape, not assumed.

``fused_layer`` runs a whole Llama-family layer in a few calls instead of ~25 torch ops, for bf16
activations (``BF16``: rounding to bf16 after every op as the torch path does, a bf16 KV cache) or float32
ones (``F32``: no rounding, a float32 KV cache; e.g. a ``--dtype float32`` GGUF stage); its projections go
through each Projection's ``decode`` (generated tokens) or ``prefill`` (prompt rows).

Batch invariance: every row of a step is computed by code that reads only that row (and its own
request's cached keys) and does the same arithmetic for it whatever else the step holds, so a row's
result does not depend on the other rows, their number or order, how its prompt was cut into
chunks, or the thread count. Which projection kernel a row takes depends on whether it is a prompt
row, never on how many rows a step has; a kernel is only picked if it passed that check on this machine.

Every cached numba function here (and in ``quant``, ``int8dot``, ``bf16dot``) says ``fastmath`` itself: numba
gives a callee that does not its caller's fastmath, and caches that code under the same key, so one
process's fastmath caller would change the bits of every later process (tests/test_kernels.py checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange, types
from numba.extending import overload

from . import bf16dot, int8dot, tuning
from .quant import DENSE, INT8, QuantMatrix, Tiled, float32_bias, read_only
from .tuning import DEFAULT_PICKS, follow_torch_threads

MAX_ROWS = tuning.MAX_ROWS  # generated-token rows per fused call
# The fused path's activation precision, named by the KV cache's element type: bf16 (the cache holds bf16
# bits, every op rounds to bf16 as torch's bf16 ops do) or float32 (a float32 cache, no rounding).
BF16, F32 = np.uint16(0), np.float32(0)


class Projection(Protocol):
    """y = x W^T (+ b), W [O, I] as stored (dense bf16/fp16/float32, or GGUF blocks)."""

    shape: tuple[int, int]  # (O, I)

    @property
    def nbytes(self) -> int: ...  # bytes as stored (weight + bias)

    def decode(self, x: np.ndarray) -> np.ndarray: ...  # generated-token rows [M, I] f32 -> [M, O] f32, batch-invariant

    def prefill(self, x: np.ndarray) -> np.ndarray: ...  # prompt rows, same shapes

    def matmul(self, x: torch.Tensor) -> torch.Tensor: ...  # torch path: [M, I] -> [M, O] in x.dtype


class Matrix(Tiled):
    """A dense weight (bf16, fp16 or float32) [O, I] and optional bias [O], used as stored: the kernels
    read a read-only view of the weight's bytes; no transposed or float32 copy is kept. Kernels: ``numba``
    (the tile kernel, widening a bf16 weight to float32 in registers), ``torch-tile`` (a tile of weight
    rows at a time widened into a scratch buffer, torch's float32 GEMM), and for activations of the
    weight's own dtype ``torch`` (torch's F.linear; for bf16 only on CPUs with AVX-512 BF16, see
    ``candidates``) and, for bf16 on CPUs with AVX-512 BF16, ``bf16dot`` (``stages.bf16dot``: those dot products in
    our own tiles); for bf16 and fp16 weights on CPUs with AVX-512, ``fma`` (the same tiles, the weight widened in
    registers, float32 fma)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        if weight.dim() != 2 or weight.dtype not in DENSE or min(weight.shape) < 1:
            raise ValueError(f"a dense weight is a non-empty 2-D bfloat16, float16 or float32 tensor; "
                             f"got {weight.dtype} {list(weight.shape)}")
        self.weight = weight.detach().contiguous()  # [O, I] (the stored tensor itself when contiguous)
        self._bias = None if bias is None else bias.detach().to(weight.dtype).contiguous()
        self.fmt, self._kind = DENSE[weight.dtype]
        self.shape = (int(weight.shape[0]), int(weight.shape[1]))
        self._block = 1
        self._bias32 = float32_bias(None if bias is None else bias.cpu(), self.shape[0])
        if self.weight.device.type == "cpu":
            self.picks = dict(DEFAULT_PICKS)
            self._kernel_blocks = read_only(self.weight.view(torch.uint8).numpy())  # [O, I * element size]
        else:  # a GPU weight: torch's F.linear only
            self.picks = dict.fromkeys(DEFAULT_PICKS, "torch")

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self._bias is None else self._bias.nbytes)

    @property
    def bias(self) -> torch.Tensor | None:  # [O] in the weight's dtype
        return self._bias

    def candidates(self, kind: str, dtype: torch.dtype) -> tuple[str, ...]:
        if self.weight.device.type != "cpu":
            return ("torch",)
        # torch's bf16 GEMM without the CPU's bf16 dot product (Intel Xeon, AVX-512 without BF16, torch 2.13) gives
        # a row other bits at other places in the batch, depending on the values: the tuning's check on random rows
        # let it through (576x1536 decode rows, picked on a loaded CPU), and SmolLM2's tokens beside other requests
        # then differed from its tokens alone (tests/test_bf16.py's 3-stage test). So bf16 needs that dot product.
        native = ("torch",) if dtype == self.weight.dtype and (dtype != torch.bfloat16 or bf16dot.SUPPORTED) else ()
        if dtype == self.weight.dtype == torch.bfloat16 and bf16dot.available(self.shape):
            native += (bf16dot.KERNEL,)  # the CPU's bf16 dot product: not the float32 kernels' sums
        if self.weight.dtype in (torch.bfloat16, torch.float16) and bf16dot.fma_available(self.shape):
            native += (bf16dot.FMA_KERNEL,)  # float32 sums like numba's, in another order
        return ("numba", "numba-gemv" if kind == "decode" else "torch-tile") + native

    def run(self, name: str, x: np.ndarray) -> np.ndarray:
        if name == bf16dot.KERNEL:
            out = bf16dot.matmul(self._kernel_blocks.view(np.uint16), x)
        elif name == bf16dot.FMA_KERNEL:
            follow_torch_threads()
            out = bf16dot.matmul_fma(self._kernel_blocks.view(np.uint16), x, self.weight.dtype == torch.float16)
        else:
            return super().run(name, x)
        return out if self._bias32 is None else out + self._bias32

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        """torch's F.linear, never on a single row: a bf16 F.linear of one row takes another code path than
        of two or more (a GEMV), whose float32 sums differ in the last bit now and then (1 bf16 output in
        ~6000 rounds the other way: SmolLM2's tokens beside other requests differed from its tokens alone;
        2026-11-30, torch 2.13, AVX-512-BF16 EPYC), while any two or more rows give a row the same bits
        (checked over 2..300 rows). So one row runs as two: itself twice."""
        x_ = x.to(self.weight.dtype)
        one = x_.shape[0] == 1
        y = F.linear(x_.expand(2, -1).contiguous() if one else x_, self.weight, self._bias)
        return (y[:1] if one else y).to(x.dtype)

    def _torch_numpy(self, x: np.ndarray) -> np.ndarray:
        return self._torch(torch.from_numpy(x).to(self.weight)).float().cpu().numpy()


class Stacked:
    """Projections of one input run as one (q/k/v or gate/up of mixed formats): outputs concatenated."""

    def __init__(self, parts: list[Projection]):
        self.parts = tuple(parts)
        self.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def decode(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([p.decode(x) for p in self.parts], axis=1)

    def prefill(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([p.prefill(x) for p in self.parts], axis=1)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.matmul(x) for p in self.parts], 1)


def stack(parts: list[Projection]) -> Projection:
    """One projection computing ``parts`` on the same input, their outputs side by side: dense parts of one
    dtype -> one Matrix over the concatenated weight (and biases, zeros where a part has none); QuantMatrix
    parts of one type -> one QuantMatrix over the concatenated blocks; anything else -> ``Stacked``. The
    result does not refer to the parts: drop them and the weights are held once."""
    if not parts:
        raise ValueError("stack needs at least one projection")
    if len({p.shape[1] for p in parts}) != 1:
        raise ValueError(f"stacked projections must share in_features; got shapes {[p.shape for p in parts]}")
    if len(parts) == 1:
        return parts[0]
    biased = any(p._bias32 is not None for p in parts if isinstance(p, Tiled))
    if all(isinstance(p, Matrix) for p in parts) and len({p.weight.dtype for p in parts}) == 1:
        bias = torch.cat([p.bias if p.bias is not None else torch.zeros(p.shape[0], dtype=p.weight.dtype)
                          for p in parts]) if biased else None
        return Matrix(torch.cat([p.weight for p in parts]), bias)
    if all(isinstance(p, QuantMatrix) for p in parts) and len({p.qtype for p in parts}) == 1:
        bias = np.concatenate([p._bias32 if p._bias32 is not None else np.zeros(p.shape[0], np.float32)
                               for p in parts]) if biased else None
        blocks = np.concatenate([p.blocks for p in parts])
        return QuantMatrix(parts[0].qtype, (blocks.shape[0], parts[0].shape[1]), blocks, bias)
    return Stacked(parts)


def tiled(projections: Iterable[Projection]) -> list[Tiled]:
    """The kernel-bearing projections (the parts of a ``Stacked`` one), each once."""
    seen: dict[int, Tiled] = {}
    for p in projections:
        for leaf in p.parts if isinstance(p, Stacked) else (p,):
            if isinstance(leaf, Tiled):
                seen.setdefault(id(leaf), leaf)
    return list(seen.values())


def tune(projections: Iterable[Projection], dtype: torch.dtype) -> dict[str, str]:
    """Choose each projection's kernels by measurement (cached per machine): see ``stages.tuning``."""
    return tuning.tune(tiled(projections), dtype)


class RowTable:
    """A module whose weight is read a row at a time (an embedding), never multiplied: ``projections`` leaves
    it out (no kernel to measure, no layout to repack its rows out of), unless a head multiplies the same
    weight (a tied head on a stage that is first and last: found through the head)."""


def projections(model: torch.nn.Module) -> list[Projection]:
    """Every projection a model holds: attributes of its modules (also modules kept as plain attributes)
    and of their ``LayerWeights``."""
    found: dict[int, Projection] = {}
    todo, seen = list(model.modules()), set()
    while todo:
        module = todo.pop()
        if id(module) in seen or isinstance(module, RowTable):
            continue
        seen.add(id(module))
        for value in vars(module).values():
            if isinstance(value, (Tiled, Stacked)):
                found.setdefault(id(value), value)
            elif isinstance(value, LayerWeights):
                for p in (value.qkv, value.o, value.gate_up, value.down):
                    if p is None:
                        continue
                    found.setdefault(id(p), p)
            elif isinstance(value, torch.nn.Module):
                todo.extend(value.modules())
    return list(found.values())


def linear_bf16(x: torch.Tensor, m: Projection) -> torch.Tensor:
    """x: [M, I] -> [M, O] in x's dtype, by ``m``'s decode kernel: every row on its own."""
    return torch.from_numpy(m.decode(np.ascontiguousarray(x.float().numpy()))).to(x.dtype)


def warm_up() -> None:
    """Compile every kernel (or load it from numba's disk cache) before the first request. Starting
    numba's OpenMP pool resets torch's thread count to numba's: keep the one the stage chose."""
    threads = torch.get_num_threads()
    try:
        _compile_all()
    finally:
        torch.set_num_threads(threads)


def _compile_all() -> None:
    linear_bf16(torch.zeros(1, 8, dtype=torch.bfloat16), Matrix(torch.zeros(2, 8, dtype=torch.bfloat16), None))
    D, heads, kv_heads, hd, inter = 8, 2, 1, 4, 8

    def zeros(o: int, i: int) -> Matrix:
        return Matrix(torch.zeros(o, i, dtype=torch.bfloat16), None)

    weights = LayerWeights(np.ones(D, np.float32), zeros((heads + 2 * kv_heads) * hd, D), zeros(D, heads * hd),
                           np.ones(D, np.float32), zeros(2 * inter, D), zeros(D, inter), 1e-6)
    for mode in (BF16, F32):
        cache = np.zeros((2, 4, kv_heads, hd), mode.dtype)
        for prompt in (False, True):
            batch = RowBatch.build(np.zeros(1, np.int64), np.ones(hd // 2, np.float32), 1.0, np.zeros(1, np.int64),
                                   np.zeros((1, 1), np.int64), 4, prompt, mode)
            fused_layer(np.zeros((1, D), np.float32), weights, batch, heads, kv_heads, hd, cache[0], cache[1])
        norm_rows(np.zeros((1, D), np.float32), np.ones(D, np.float32), 1e-6, mode)
    for name in ("torch-tile", "numba-gemv"):  # the row decoder (embedding rows too), the bf16 GEMV
        zeros(2, D).run(name, np.zeros((1, D), np.float32))


# --- one whole decoder layer, row by row (bf16 values held in float32) -----------------------------
# Torch runs a decode layer as ~25 small ops plus Python, ~0.4 ms per layer on this CPU: more than
# reading its weights. This kernel runs a Llama-family layer in a few calls, rounding to bf16 wherever
# the torch path does (after every op), so both paths compute the same function. Every loop below
# handles one row at a time (or one row and head), never several rows together.


@njit(inline="always")
def _bf(bits) -> np.float32:  # bf16 bits -> float32
    return np.uint32(np.uint32(bits) << np.uint32(16)).view(np.float32)


@njit(inline="always")
def _bits(x) -> np.uint16:  # float32 -> bf16 bits, round to nearest even (as torch)
    u = np.float32(x).view(np.uint32)
    return np.uint16((np.uint64(u) + np.uint64(0x7FFF) + ((np.uint64(u) >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16))


@njit(inline="always")
def _r(x) -> np.float32:  # round a float32 to bf16 precision
    return _bf(_bits(x))


def _keep(x, mode):  # x at the activation precision of ``mode`` (BF16: rounded to bf16; F32: as is)
    raise NotImplementedError  # numba only: see the overload


def _store(x, mode):  # x as the KV cache of ``mode`` holds it (bf16 bits or float32)
    raise NotImplementedError


def _load(v):  # a KV cache element as float32
    raise NotImplementedError


@overload(_keep, inline="always")
def _keep_numba(x, mode):
    return (lambda x, mode: _r(x)) if isinstance(mode, types.Integer) else (lambda x, mode: np.float32(x))


@overload(_store, inline="always")
def _store_numba(x, mode):
    return (lambda x, mode: _bits(x)) if isinstance(mode, types.Integer) else (lambda x, mode: np.float32(x))


@overload(_load, inline="always")
def _load_numba(v):
    return (lambda v: _bf(v)) if isinstance(v, types.Integer) else (lambda v: np.float32(v))


@njit(inline="always")
def _norm(h, w, eps, out, mode) -> None:  # RMSNorm: normalize in float32, round, scale (in bf16 for BF16)
    ss = np.float32(0.0)
    for i in range(h.shape[0]):
        ss += h[i] * h[i]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(h.shape[0]) + np.float32(eps))
    for i in range(h.shape[0]):
        out[i] = _keep(w[i] * _keep(h[i] * inv, mode), mode)


@njit(parallel=True, fastmath=True, cache=True)
def _attend(qkv, cos, sin, heads, kv_heads, hd, k_cache, v_cache, write_slots, tables, lengths, block_size, scale, out,
            mode, window):
    """RoPE on q and k, write k/v to the cache, attend over each row's blocks. qkv: [B, (H+2KV)*hd]. A row
    attends to its last ``window`` keys (its own included; 0: to all of them)."""
    B = qkv.shape[0]
    half = hd // 2
    rq = np.empty((B, heads + kv_heads, hd), np.float32)  # q and k after RoPE
    for b in range(B):
        for j in range(heads + kv_heads):
            base = j * hd
            for i in range(hd):
                other = qkv[b, base + i + half] if i < half else qkv[b, base + i - half]
                rq[b, j, i] = _keep(_keep(qkv[b, base + i] * cos[b, i], mode) + _keep(other * sin[b, i], mode), mode)
        slot = write_slots[b]
        for g in range(kv_heads):
            for i in range(hd):
                k_cache[slot, g, i] = _store(rq[b, heads + g, i], mode)
                v_cache[slot, g, i] = _store(qkv[b, (heads + kv_heads + g) * hd + i], mode)
    group = heads // kv_heads
    for bh in prange(B * heads):
        b, h = bh // heads, bh % heads
        g, n = h // group, lengths[b]
        lo = max(0, n - window) if window > 0 else 0  # the first key the row sees
        scores = np.empty(n - lo, np.float32)
        top = np.float32(-np.inf)
        for p in range(lo, n):
            slot = tables[b, p // block_size] * block_size + p % block_size
            s = np.float32(0.0)
            for i in range(hd):
                s += rq[b, h, i] * _load(k_cache[slot, g, i])
            scores[p - lo] = s * scale
            top = max(top, scores[p - lo])
        total = np.float32(0.0)
        for p in range(n - lo):
            scores[p] = np.exp(scores[p] - top)
            total += scores[p]
        acc = np.zeros(hd, np.float32)
        for p in range(lo, n):
            slot = tables[b, p // block_size] * block_size + p % block_size
            for i in range(hd):
                acc[i] += scores[p - lo] * _load(v_cache[slot, g, i])
        for i in range(hd):
            out[b, h * hd + i] = _keep(acc[i] / total, mode)


@njit(fastmath=True, cache=True)
def _residual_norm(h, add, w, eps, normed, mode) -> None:  # h = bf16(h + add); normed = RMSNorm(h)
    for b in range(h.shape[0]):
        for i in range(h.shape[1]):
            h[b, i] = _keep(h[b, i] + add[b, i], mode)
        _norm(h[b], w, eps, normed[b], mode)


@njit(fastmath=True, cache=True)
def _silu_mul(gu, inter, out, mode) -> None:  # out = bf16(bf16(silu(gate)) * up)
    for b in range(gu.shape[0]):
        for i in range(inter):
            g = gu[b, i]
            out[b, i] = _keep(_keep(g / (np.float32(1.0) + np.exp(-g)), mode) * gu[b, inter + i], mode)


@njit(cache=True, fastmath=False)
def _rope_rows(positions, inv_freq, scaling, cos, sin, mode) -> None:
    """cos, sin: [T, hd] from each row's own position (float32, rounded to bf16; sin's first half
    negated, see ``_attend``). Exact float32 math (no fastmath): cos/sin of large angles."""
    half = inv_freq.shape[0]
    for t in range(positions.shape[0]):
        for i in range(half):
            f = np.float32(positions[t]) * inv_freq[i]
            c, s = _keep(np.float32(np.cos(f)) * scaling, mode), _keep(np.float32(np.sin(f)) * scaling, mode)
            cos[t, i], cos[t, half + i], sin[t, i], sin[t, half + i] = c, c, -s, s


@njit(fastmath=True, cache=True)
def _norm_rows(h, w, eps, out, mode) -> None:
    for b in range(h.shape[0]):
        _norm(h[b], w, eps, out[b], mode)


@njit(fastmath=True, cache=True)
def _add_rows(h, add, mode) -> None:  # h = bf16(h + add)
    for b in range(h.shape[0]):
        for i in range(h.shape[1]):
            h[b, i] = _keep(h[b, i] + add[b, i], mode)


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer as the kernels read it: the four projections (q/k/v and gate/up stacked),
    norm weights as float32 (bf16 values)."""

    ln1: np.ndarray  # [D]
    qkv: Projection  # [(H + 2KV) * hd, D]
    o: Projection  # [D, H * hd]
    ln2: np.ndarray  # [D]
    gate_up: Projection | None  # [2I, D]; None: the layer's MLP is not one gated MLP (mixture of experts)
    down: Projection | None  # [D, I]
    eps: float
    int8: dict = field(default_factory=dict, compare=False, repr=False)  # row kind -> ``_int8_weights`` (kept)


@dataclass(frozen=True)
class RowBatch:
    """What every layer of one fused step shares: T rows, each one position of a request that
    attends over its own request's keys (the new ones of this step included)."""

    cos: np.ndarray  # [T, hd] float32 (bf16 values for BF16; sin with its first half negated)
    sin: np.ndarray
    write_slots: np.ndarray  # [T] int64: where each row's key/value goes
    tables: np.ndarray  # [T, nb] int64: each row's block table
    lengths: np.ndarray  # [T] int64: keys each row attends to (its position + 1)
    block_size: int
    prompt: bool  # prompt rows (projections' ``prefill``) or generated tokens (their ``decode``)
    mode: np.uint16 | np.float32 = BF16  # activation precision: BF16 or F32

    @classmethod
    def build(cls, positions: np.ndarray, inv_freq: np.ndarray, scaling: float, write_slots: np.ndarray,
              tables: np.ndarray, block_size: int, prompt: bool, mode: np.uint16 | np.float32 = BF16) -> "RowBatch":
        """positions: [T] int64; inv_freq: [hd/2] float32 (RoPE)."""
        cos = np.empty((len(positions), 2 * len(inv_freq)), np.float32)
        sin = np.empty_like(cos)
        _rope_rows(positions, inv_freq, np.float32(scaling), cos, sin, mode)
        return cls(cos, sin, write_slots, tables, positions + 1, block_size, prompt, mode)


def fused_layer(h: np.ndarray, w: LayerWeights, batch: RowBatch, heads: int, kv_heads: int, head_dim: int,
                k_cache: np.ndarray, v_cache: np.ndarray, window: int = 0) -> None:
    """h: [T, D] float32 (bf16 values for BF16), updated in place; k_cache, v_cache: [slots, KV, hd] of the
    batch's mode: bf16 bits (uint16) or float32; ``window``: a sliding layer's (0: none)."""
    whole = _int8_weights(w, batch.prompt)
    if whole is not None:  # every projection by the int8 kernel: the layer in one numba call
        _check_cache(k_cache, v_cache, batch.mode)
        follow_torch_threads()
        _layer_int8(h, w.ln1, w.ln2, np.float32(w.eps), whole, batch.cos, batch.sin, heads, kv_heads, head_dim, k_cache,
                    v_cache, batch.write_slots, batch.tables, batch.lengths, batch.block_size,
                    np.float32(head_dim ** -0.5), batch.mode, window)
        return
    normed = attention_rows(h, w, batch, heads, kv_heads, head_dim, k_cache, v_cache, window=window)
    add_rows(h, mlp_rows(w.gate_up, w.down, normed, batch), batch.mode)


def _int8_weights(w: LayerWeights, prompt: bool) -> tuple | None:
    """``QuantMatrix.int8_operands`` of qkv, o, gate_up and down when the row kind (prompt rows or not) runs all
    four by the int8 kernel (``stages.int8dot``), else None (looked up once per layer and row kind)."""
    kind = "prefill" if prompt else "decode"
    if kind not in w.int8:
        parts = (w.qkv, w.o, w.gate_up, w.down)
        whole = all(isinstance(p, QuantMatrix) and p.picks[kind] == INT8 for p in parts)
        w.int8[kind] = tuple(p.int8_operands() for p in parts) if whole else None
    return w.int8[kind]


@njit(fastmath=True, cache=True)
def _project_int8(part, x, mode):  # part: QuantMatrix.int8_operands(); x [T, I] -> [T, O] at the activation precision
    kind, tiles, bias = part
    out = int8dot._matmul(kind, tiles, x)
    for t in range(out.shape[0]):
        for o in range(out.shape[1]):
            out[t, o] = _keep(out[t, o] + (bias[o] if bias.shape[0] else np.float32(0)), mode)
    return out


@njit(fastmath=True, cache=True)
def _layer_int8(h, ln1, ln2, eps, parts, cos, sin, heads, kv_heads, hd, k_cache, v_cache, write_slots, tables,
                lengths, block_size, scale, mode, window) -> None:
    """``fused_layer`` with every projection by the int8 kernel: the same ops in the same order."""
    qkv_p, o_p, gu_p, down_p = parts
    normed = np.empty_like(h)
    _norm_rows(h, ln1, eps, normed, mode)
    qkv = _project_int8(qkv_p, normed, mode)  # [T, (H + 2KV) * hd]
    attn = np.empty((h.shape[0], heads * hd), np.float32)
    _attend(qkv, cos, sin, heads, kv_heads, hd, k_cache, v_cache, write_slots, tables, lengths, block_size, scale, attn,
            mode, window)
    _residual_norm(h, _project_int8(o_p, attn, mode), ln2, eps, normed, mode)
    gu = _project_int8(gu_p, normed, mode)  # [T, 2I]
    inter = gu.shape[1] // 2
    m = np.empty((h.shape[0], inter), np.float32)
    _silu_mul(gu, inter, m, mode)
    _add_rows(h, _project_int8(down_p, m, mode), mode)


def int8_stage(layers: Sequence[tuple[LayerWeights, int]], prompt: bool) -> list[tuple] | None:
    """A stage's layers (weights, sliding window or 0) for ``fused_stage``: each one's norms, eps and the operands
    of its four projections, and its window; None unless every layer runs all four projections by the int8 kernel
    for this row kind."""
    entries = []
    for w, window in layers:
        whole = _int8_weights(w, prompt)
        if whole is None:
            return None
        entries.append((w.ln1, w.ln2, np.float32(w.eps), whole, window))
    return entries


def fused_stage(h: np.ndarray, layers: list[tuple], batch: RowBatch, heads: int, kv_heads: int, head_dim: int,
                k_cache: Sequence[np.ndarray], v_cache: Sequence[np.ndarray]) -> None:
    """``fused_layer`` over every layer of ``int8_stage``: one numba call a layer, its arguments looked up once
    (the layer-by-layer path spends ~20 us of Python a layer around the call: 0.15-0.3 ms a SmolLM2 stage step).
    h: [T, D], updated in place; k_cache, v_cache: each layer's [slots, KV, hd]."""
    _check_cache(k_cache[0], v_cache[0], batch.mode)
    follow_torch_threads()
    b, scale = batch, np.float32(head_dim ** -0.5)
    for i, (ln1, ln2, eps, parts, window) in enumerate(layers):
        _layer_int8(h, ln1, ln2, eps, parts, b.cos, b.sin, heads, kv_heads, head_dim, k_cache[i], v_cache[i],
                    b.write_slots, b.tables, b.lengths, b.block_size, scale, b.mode, window)


def attention_rows(h: np.ndarray, w: LayerWeights, batch: RowBatch, heads: int, kv_heads: int, head_dim: int,
                   k_cache: np.ndarray, v_cache: np.ndarray, qk_norm: tuple[np.ndarray, np.ndarray] | None = None,
                   window: int = 0) -> np.ndarray:
    """A layer's first half: h += o(attention(qkv(RMSNorm(h)))) in place; returns RMSNorm(h) with ``w.ln2``
    (the MLP's input, [T, D]). ``qk_norm``: RMSNorm weights [hd] of each query head and each key head (Qwen3);
    ``window``: a sliding layer's (each row attends to its last ``window`` keys; 0: to all)."""
    mode = batch.mode
    _check_cache(k_cache, v_cache, mode)
    T = h.shape[0]
    follow_torch_threads()
    normed = np.empty_like(h)
    _norm_rows(h, w.ln1, w.eps, normed, mode)
    qkv = _project(w.qkv, normed, batch)  # [T, (H + 2KV) * hd]
    if qk_norm is not None:
        for (lo, hi), weight in zip(((0, heads), (heads, heads + kv_heads)), qk_norm):
            part = np.ascontiguousarray(qkv[:, lo * head_dim : hi * head_dim]).reshape(T * (hi - lo), head_dim)
            qkv[:, lo * head_dim : hi * head_dim] = norm_rows(part, weight, w.eps, mode).reshape(T, (hi - lo) * head_dim)
    attn = np.empty((T, heads * head_dim), np.float32)
    _attend(qkv, batch.cos, batch.sin, heads, kv_heads, head_dim, k_cache, v_cache, batch.write_slots, batch.tables,
            batch.lengths, batch.block_size, np.float32(head_dim ** -0.5), attn, mode, window)
    _residual_norm(h, _project(w.o, attn, batch), w.ln2, w.eps, normed, mode)
    return normed


def _check_cache(k_cache: np.ndarray, v_cache: np.ndarray, mode: np.uint16 | np.float32) -> None:
    if k_cache.dtype != mode.dtype or v_cache.dtype != mode.dtype:
        raise ValueError(f"a {mode.dtype} fused step needs a {mode.dtype} KV cache; got {k_cache.dtype}, {v_cache.dtype}")


def mlp_rows(gate_up: Projection, down: Projection, x: np.ndarray, batch: RowBatch) -> np.ndarray:
    """A gated SiLU MLP over rows: x [n, D] float32 -> [n, D] (rounded to bf16 for BF16)."""
    gu = _project(gate_up, x, batch)  # [n, 2I]
    inter = down.shape[1]
    m = np.empty((x.shape[0], inter), np.float32)
    _silu_mul(gu, inter, m, batch.mode)
    return _project(down, m, batch)


def project_rows(p: Projection, x: np.ndarray, batch: RowBatch) -> np.ndarray:
    """x [T, I] float32 -> [T, O] float32 by the batch's row kind, rounded to bf16 for BF16."""
    return _project(p, x, batch)


def add_rows(h: np.ndarray, add: np.ndarray, mode: np.uint16 | np.float32) -> None:
    """h = h + add in place, rounded to bf16 for BF16."""
    _add_rows(h, add, mode)


def keep_rows(a: np.ndarray, mode: np.uint16 | np.float32) -> np.ndarray:
    """``a`` [n, ...] at the precision of ``mode``: rounded to bf16 (in place) for BF16, as is for F32."""
    a = np.ascontiguousarray(a, np.float32)
    if mode.dtype == BF16.dtype:
        _round_rows(a.reshape(a.shape[0], -1))
    return a


def _project(p: Projection, x: np.ndarray, batch: RowBatch) -> np.ndarray:
    """x [T, I] float32 -> [T, O] float32, rounded to bf16 for BF16 (as torch rounds a bf16 op)."""
    out = p.prefill(x) if batch.prompt else p.decode(x)
    if batch.mode.dtype == BF16.dtype:
        _round_rows(out)
    return out


@njit(fastmath=True, cache=True)
def _round_rows(h) -> None:  # h = bf16(h), in place
    for b in range(h.shape[0]):
        for i in range(h.shape[1]):
            h[b, i] = _r(h[b, i])


def norm_rows(h: np.ndarray, w: np.ndarray, eps: float, mode: np.uint16 | np.float32 = BF16) -> np.ndarray:
    """RMSNorm of each row of h: [T, D] float32 (bf16 values for BF16; the last stage's final norm)."""
    out = np.empty_like(h)
    _norm_rows(h, w, eps, out, mode)
    return out
