"""numba kernels for bf16 decode on CPUs (the rows of a decode step, up to ``MAX_ROWS``).

Decode at small batch is bound by reading the weights and by per-op overhead. On CPUs without
native bf16 math (AVX2), torch reads bf16 weights at ~12 GB/s at one row and converts to a float32
GEMM from 4 rows on, which reads twice the bytes. ``linear_bf16`` widens each bf16 weight to
float32 in registers (a 16-bit shift) and reads the weights once for all rows: for the 15 layers of
a SmolLM2 stage, 1 row 4.3 vs 6.7 ms, 4 rows 7.6 vs 31.6 ms, 16 rows 26.5 vs 39.5 ms. Above
``MAX_ROWS`` rows (prefill) the float32 GEMM wins. ``decode_layer`` runs a whole Llama-family layer
in a few calls instead of ~25 torch ops (a 15-layer step at one row: 12.6 -> 7.6 ms). Each output
row is computed the same way whatever the number of rows, so a request's tokens do not depend on
what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import njit, prange

MAX_ROWS = 16


def bits(weight: torch.Tensor) -> np.ndarray:
    """The bf16 weight's bits as a uint16 array sharing its memory: [O, I]."""
    return weight.detach().contiguous().view(torch.int16).numpy().view(np.uint16)


def matrix(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """A bf16 projection as kernel arrays: weight bits [O, I] (a view) and the bias as float32 (zeros without one)."""
    b = bias.detach().float() if bias is not None else torch.zeros(weight.shape[0])
    return bits(weight), b.numpy()


def linear_bf16(x: torch.Tensor, w_bits: np.ndarray, bias: np.ndarray) -> torch.Tensor:
    """x: [M, I] (M <= MAX_ROWS) -> [M, O] in x's dtype; float32 accumulation like torch."""
    x32 = np.ascontiguousarray(x.float().numpy())
    out = np.empty((x.shape[0], w_bits.shape[0]), np.float32)
    follow_torch_threads()
    _gemv_rows(w_bits, bias, x32, out)
    return torch.from_numpy(out).to(x.dtype)


def follow_torch_threads() -> None:
    """numba's thread count is set per calling thread (the engine steps in a worker thread)."""
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)


def warm_up() -> None:
    """Compile every kernel (or load it from numba's disk cache) before the first request."""
    w = torch.zeros(2, 8, dtype=torch.bfloat16)
    linear_bf16(torch.zeros(1, 8, dtype=torch.bfloat16), *matrix(w, None))
    D, heads, kv_heads, hd, inter = 8, 2, 1, 4, 8
    weights = LayerWeights(np.ones(D, np.float32), *matrix(torch.zeros((heads + 2 * kv_heads) * hd, D, dtype=torch.bfloat16), None),
                           *matrix(torch.zeros(D, heads * hd, dtype=torch.bfloat16), None), np.ones(D, np.float32),
                           *matrix(torch.zeros(2 * inter, D, dtype=torch.bfloat16), None),
                           *matrix(torch.zeros(D, inter, dtype=torch.bfloat16), None), 1e-6)
    cache = np.zeros((2, 4, kv_heads, hd), np.uint16)
    batch = DecodeBatch(np.ones((1, hd), np.float32), np.zeros((1, hd), np.float32), np.zeros(1, np.int64),
                        np.zeros((1, 1), np.int64), np.ones(1, np.int64), 4)
    decode_layer(np.zeros((1, D), np.float32), weights, batch, heads, kv_heads, hd, cache[0], cache[1])


# --- one whole decoder layer for decode rows (bf16 values held in float32) -------------------------
# Torch runs a decode layer as ~25 small ops plus Python, ~0.4 ms per layer on this CPU: more than
# reading its weights. This kernel runs a Llama-family layer in one call, rounding to bf16 wherever
# the torch path does (after every op), so both paths compute the same function.


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


@njit(inline="always")
def _norm(h, w, eps, out) -> None:  # RMSNorm: normalize in float32, round, scale in bf16
    ss = np.float32(0.0)
    for i in range(h.shape[0]):
        ss += h[i] * h[i]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(h.shape[0]) + np.float32(eps))
    for i in range(h.shape[0]):
        out[i] = _r(w[i] * _r(h[i] * inv))


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_rows(w, bias, x, out) -> None:  # out[b, o] = bf16(w[o] . x[b] + bias[o])
    O, I = w.shape
    for o in prange(O):
        row = w[o]
        for b in range(x.shape[0]):
            xb = x[b]
            acc = np.float32(0.0)
            for i in range(I):
                acc += _bf(row[i]) * xb[i]
            out[b, o] = _r(acc + bias[o])


@njit(parallel=True, fastmath=True, cache=True)
def _attend(qkv, cos, sin, heads, kv_heads, hd, k_cache, v_cache, write_slots, tables, lengths, block_size, scale, out):
    """RoPE on q and k, write k/v to the cache, attend over each row's blocks. qkv: [B, (H+2KV)*hd]."""
    B = qkv.shape[0]
    half = hd // 2
    rq = np.empty((B, heads + kv_heads, hd), np.float32)  # q and k after RoPE
    for b in range(B):
        for j in range(heads + kv_heads):
            base = j * hd
            for i in range(hd):
                other = qkv[b, base + i + half] if i < half else qkv[b, base + i - half]
                rq[b, j, i] = _r(_r(qkv[b, base + i] * cos[b, i]) + _r(other * sin[b, i]))
        slot = write_slots[b]
        for g in range(kv_heads):
            for i in range(hd):
                k_cache[slot, g, i] = _bits(rq[b, heads + g, i])
                v_cache[slot, g, i] = _bits(qkv[b, (heads + kv_heads + g) * hd + i])
    group = heads // kv_heads
    for bh in prange(B * heads):
        b, h = bh // heads, bh % heads
        g, n = h // group, lengths[b]
        scores = np.empty(n, np.float32)
        top = np.float32(-np.inf)
        for p in range(n):
            slot = tables[b, p // block_size] * block_size + p % block_size
            s = np.float32(0.0)
            for i in range(hd):
                s += rq[b, h, i] * _bf(k_cache[slot, g, i])
            scores[p] = s * scale
            top = max(top, scores[p])
        total = np.float32(0.0)
        for p in range(n):
            scores[p] = np.exp(scores[p] - top)
            total += scores[p]
        acc = np.zeros(hd, np.float32)
        for p in range(n):
            slot = tables[b, p // block_size] * block_size + p % block_size
            for i in range(hd):
                acc[i] += scores[p] * _bf(v_cache[slot, g, i])
        for i in range(hd):
            out[b, h * hd + i] = _r(acc[i] / total)


@njit(fastmath=True, cache=True)
def _residual_norm(h, add, w, eps, normed) -> None:  # h = bf16(h + add); normed = RMSNorm(h)
    for b in range(h.shape[0]):
        for i in range(h.shape[1]):
            h[b, i] = _r(h[b, i] + add[b, i])
        _norm(h[b], w, eps, normed[b])


@njit(fastmath=True, cache=True)
def _silu_mul(gu, inter, out) -> None:  # out = bf16(bf16(silu(gate)) * up)
    for b in range(gu.shape[0]):
        for i in range(inter):
            g = gu[b, i]
            out[b, i] = _r(_r(g / (np.float32(1.0) + np.exp(-g))) * gu[b, inter + i])


@njit(fastmath=True, cache=True)
def _norm_rows(h, w, eps, out) -> None:
    for b in range(h.shape[0]):
        _norm(h[b], w, eps, out[b])


@njit(fastmath=True, cache=True)
def _add_rows(h, add) -> None:  # h = bf16(h + add)
    for b in range(h.shape[0]):
        for i in range(h.shape[1]):
            h[b, i] = _r(h[b, i] + add[b, i])


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer as arrays: bf16 matrices as uint16 bits (views of the torch weights),
    norm weights and biases as float32 (bf16 values; zeros where a projection has no bias)."""

    ln1: np.ndarray  # [D]
    qkv: np.ndarray  # [(H + 2KV) * hd, D]
    qkv_bias: np.ndarray
    o: np.ndarray  # [D, H * hd]
    o_bias: np.ndarray
    ln2: np.ndarray  # [D]
    gate_up: np.ndarray  # [2I, D]
    gate_up_bias: np.ndarray
    down: np.ndarray  # [D, I]
    down_bias: np.ndarray
    eps: float


@dataclass(frozen=True)
class DecodeBatch:
    """What every layer of one decode step shares: B rows, each one new token of a request."""

    cos: np.ndarray  # [B, hd] float32 (bf16 values; sin with its first half negated)
    sin: np.ndarray
    write_slots: np.ndarray  # [B] int64: where each row's key/value goes
    tables: np.ndarray  # [B, nb] int64 block tables
    lengths: np.ndarray  # [B] int64: keys per row, the new one included
    block_size: int


def decode_layer(h: np.ndarray, w: LayerWeights, batch: DecodeBatch, heads: int, kv_heads: int, head_dim: int,
                 k_cache: np.ndarray, v_cache: np.ndarray) -> None:
    """h: [B, D] float32 holding bf16 values, updated in place; k_cache, v_cache: [slots, KV, hd] bf16 bits."""
    B, D = h.shape
    follow_torch_threads()
    normed = np.empty_like(h)
    _norm_rows(h, w.ln1, w.eps, normed)
    qkv = np.empty((B, w.qkv.shape[0]), np.float32)
    _gemv_rows(w.qkv, w.qkv_bias, normed, qkv)
    attn = np.empty((B, heads * head_dim), np.float32)
    _attend(qkv, batch.cos, batch.sin, heads, kv_heads, head_dim, k_cache, v_cache, batch.write_slots, batch.tables,
            batch.lengths, batch.block_size, np.float32(head_dim ** -0.5), attn)
    o = np.empty_like(h)
    _gemv_rows(w.o, w.o_bias, attn, o)
    _residual_norm(h, o, w.ln2, w.eps, normed)
    gu = np.empty((B, w.gate_up.shape[0]), np.float32)
    _gemv_rows(w.gate_up, w.gate_up_bias, normed, gu)
    inter = w.down.shape[1]
    m = np.empty((B, inter), np.float32)
    _silu_mul(gu, inter, m)
    _gemv_rows(w.down, w.down_bias, m, o)
    _add_rows(h, o)
