"""numba kernels for bf16 Llama-family layers on CPUs: generated tokens and prompt rows.

Decode at small batch is bound by reading the weights and by per-op overhead. On CPUs without
native bf16 math (AVX2), torch reads bf16 weights at ~12 GB/s at one row and converts to a float32
GEMM from 4 rows on, which reads twice the bytes. ``_gemv_rows`` widens each bf16 weight to
float32 in registers (a 16-bit shift) and reads the weights once for all rows: for the 15 layers of
a SmolLM2 stage, 1 row 4.3 vs 6.7 ms, 4 rows 7.6 vs 31.6 ms, 16 rows 26.5 vs 39.5 ms. Prompt rows
go through ``_gemm_rows`` instead, four rows per pass over a transposed copy of the bf16 weight
(no float32 copy). ``fused_layer`` runs a whole Llama-family layer in a few calls instead of ~25
torch ops (a 15-layer step at one row: 12.6 -> 7.6 ms).

Batch invariance: every row of a step is computed by code that reads only that row (and its own
request's cached keys) and does the same arithmetic for it whatever else the step holds, so a row's
result does not depend on the other rows, their number or order, how its prompt was cut into
chunks, or the thread count. Which projection kernel a row takes depends on whether it is a prompt
row, never on how many rows a step has.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numba
import numpy as np
import torch
from numba import njit, prange

MAX_ROWS = 16  # rows per _gemv_rows call (torch path: above it, the float32 GEMM is faster)


def bits(weight: torch.Tensor) -> np.ndarray:
    """The bf16 weight's bits as a uint16 array sharing its memory: [O, I]."""
    return weight.detach().contiguous().view(torch.int16).numpy().view(np.uint16)


class Matrix:
    """A projection y = x W^T + b of a reduced-precision weight as the CPU kernels read it, each form
    made on first use: the bf16 bits of W (a view of its memory) for ``_gemv_rows``, a transposed
    copy of them for ``_gemm_rows``, and a float32 copy of W and b for torch's float32 GEMM (the torch
    path: converting on every call costs more than the GEMM)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self._bias = weight.detach(), None if bias is None else bias.detach()

    @cached_property
    def bits(self) -> np.ndarray:  # [O, I] uint16
        return bits(self.weight)

    @cached_property
    def bits_t(self) -> np.ndarray:  # [I, O] uint16: W^T, for ``_gemm_rows``
        return np.ascontiguousarray(self.bits.T)

    @cached_property
    def bias(self) -> np.ndarray:  # [O] float32, zeros without a bias
        b = self._bias.float() if self._bias is not None else torch.zeros(self.weight.shape[0])
        return b.numpy()

    @cached_property
    def fp32(self) -> tuple[torch.Tensor, torch.Tensor | None]:  # [O, I], [O] or None
        return self.weight.float(), None if self._bias is None else self._bias.float()


def linear_bf16(x: torch.Tensor, m: Matrix) -> torch.Tensor:
    """x: [M, I] -> [M, O] in x's dtype; float32 accumulation like torch, each row on its own."""
    return torch.from_numpy(_gemv(np.ascontiguousarray(x.float().numpy()), m)).to(x.dtype)


def _gemv(x: np.ndarray, m: Matrix) -> np.ndarray:
    """x: [M, I] float32 -> [M, O] float32 holding bf16 values. Every row is its own dot products:
    the same whatever M."""
    out = np.empty((x.shape[0], m.bits.shape[0]), np.float32)
    follow_torch_threads()
    _gemv_rows(m.bits, m.bias, x, out)
    return out


def _gemm(x: np.ndarray, m: Matrix) -> np.ndarray:
    """Prompt rows: x [T, I] float32 -> [T, O] float32 holding bf16 values, by ``_gemm_rows`` (a
    GEMM over the transposed weight, four rows at a time: ~1.4x MKL's float32 time at 512 rows, as
    fast at 32). Each row takes the same arithmetic whatever the number of rows, their order or the
    thread count. BLAS does not promise that and does not do it: MKL's sgemm gave a row other bits
    at 17, 64 or 100 rows than among 1024, and at 16 threads even in a call of a fixed shape, at
    another place in it (measured on two Xeons, torch 2.11 and 2.13)."""
    T = x.shape[0]
    padded = np.zeros((-(-T // 4) * 4, x.shape[1]), np.float32)  # [T', I], T' a multiple of 4
    padded[:T] = x
    out = np.empty((padded.shape[0], m.bits_t.shape[1]), np.float32)
    follow_torch_threads()
    _gemm_rows(m.bits_t, m.bias, padded, out)
    return out[:T]


def follow_torch_threads() -> None:
    """numba's thread count is set per calling thread (the engine steps in a worker thread)."""
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)


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
    cache = np.zeros((2, 4, kv_heads, hd), np.uint16)
    for prompt in (False, True):
        batch = RowBatch.build(np.zeros(1, np.int64), np.ones(hd // 2, np.float32), 1.0, np.zeros(1, np.int64),
                               np.zeros((1, 1), np.int64), 4, prompt)
        fused_layer(np.zeros((1, D), np.float32), weights, batch, heads, kv_heads, hd, cache[0], cache[1])
    norm_rows(np.zeros((1, D), np.float32), np.ones(D, np.float32), 1e-6)


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


@njit(parallel=True, fastmath={"contract"}, cache=True)
def _gemm_rows(w_t, bias, x, out) -> None:  # out[t, o] = bf16(x[t] . w[o] + bias[o]); T % 4 == 0
    """w_t: [I, O] bf16 bits; x: [T, I] float32 holding bf16 values. Four rows share each pass over
    four rows of w_t, each output summed in order of i: the same sums for every row, and exact
    products (bf16 x bf16 fits float32), so a row's bits do not depend on the other rows."""
    T, I = x.shape
    O = w_t.shape[1]
    whole = I - I % 4
    for block in prange(T // 4):
        r = 4 * block
        o0, o1, o2, o3 = out[r], out[r + 1], out[r + 2], out[r + 3]
        for c in range(O):
            o0[c], o1[c], o2[c], o3[c] = 0.0, 0.0, 0.0, 0.0
        for i in range(0, whole, 4):
            w0, w1, w2, w3 = w_t[i], w_t[i + 1], w_t[i + 2], w_t[i + 3]
            a0, a1, a2, a3 = x[r, i], x[r, i + 1], x[r, i + 2], x[r, i + 3]
            b0, b1, b2, b3 = x[r + 1, i], x[r + 1, i + 1], x[r + 1, i + 2], x[r + 1, i + 3]
            c0, c1, c2, c3 = x[r + 2, i], x[r + 2, i + 1], x[r + 2, i + 2], x[r + 2, i + 3]
            d0, d1, d2, d3 = x[r + 3, i], x[r + 3, i + 1], x[r + 3, i + 2], x[r + 3, i + 3]
            for c in range(O):
                p, q, u, v = _bf(w0[c]), _bf(w1[c]), _bf(w2[c]), _bf(w3[c])
                o0[c] = o0[c] + a0 * p + a1 * q + a2 * u + a3 * v
                o1[c] = o1[c] + b0 * p + b1 * q + b2 * u + b3 * v
                o2[c] = o2[c] + c0 * p + c1 * q + c2 * u + c3 * v
                o3[c] = o3[c] + d0 * p + d1 * q + d2 * u + d3 * v
        for i in range(whole, I):
            w0 = w_t[i]
            a0, b0, c0, d0 = x[r, i], x[r + 1, i], x[r + 2, i], x[r + 3, i]
            for c in range(O):
                p = _bf(w0[c])
                o0[c], o1[c], o2[c], o3[c] = o0[c] + a0 * p, o1[c] + b0 * p, o2[c] + c0 * p, o3[c] + d0 * p
        for c in range(O):
            o0[c], o1[c], o2[c] = _r(o0[c] + bias[c]), _r(o1[c] + bias[c]), _r(o2[c] + bias[c])
            o3[c] = _r(o3[c] + bias[c])


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


@njit(cache=True)
def _rope_rows(positions, inv_freq, scaling, cos, sin) -> None:
    """cos, sin: [T, hd] from each row's own position (float32, rounded to bf16; sin's first half
    negated, see ``_attend``). Exact float32 math (no fastmath): cos/sin of large angles."""
    half = inv_freq.shape[0]
    for t in range(positions.shape[0]):
        for i in range(half):
            f = np.float32(positions[t]) * inv_freq[i]
            c, s = _r(np.float32(np.cos(f)) * scaling), _r(np.float32(np.sin(f)) * scaling)
            cos[t, i], cos[t, half + i], sin[t, i], sin[t, half + i] = c, c, -s, s


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
    """One decoder layer as the kernels read it: the four projections (q/k/v and gate/up stacked),
    norm weights as float32 (bf16 values)."""

    ln1: np.ndarray  # [D]
    qkv: Matrix  # [(H + 2KV) * hd, D]
    o: Matrix  # [D, H * hd]
    ln2: np.ndarray  # [D]
    gate_up: Matrix  # [2I, D]
    down: Matrix  # [D, I]
    eps: float


@dataclass(frozen=True)
class RowBatch:
    """What every layer of one fused step shares: T rows, each one position of a request that
    attends over its own request's keys (the new ones of this step included)."""

    cos: np.ndarray  # [T, hd] float32 (bf16 values; sin with its first half negated)
    sin: np.ndarray
    write_slots: np.ndarray  # [T] int64: where each row's key/value goes
    tables: np.ndarray  # [T, nb] int64: each row's block table
    lengths: np.ndarray  # [T] int64: keys each row attends to (its position + 1)
    block_size: int
    prompt: bool  # prompt rows (projections by ``_gemm``) or generated tokens (``_gemv``)

    @classmethod
    def build(cls, positions: np.ndarray, inv_freq: np.ndarray, scaling: float, write_slots: np.ndarray,
              tables: np.ndarray, block_size: int, prompt: bool) -> "RowBatch":
        """positions: [T] int64; inv_freq: [hd/2] float32 (RoPE)."""
        cos = np.empty((len(positions), 2 * len(inv_freq)), np.float32)
        sin = np.empty_like(cos)
        _rope_rows(positions, inv_freq, np.float32(scaling), cos, sin)
        return cls(cos, sin, write_slots, tables, positions + 1, block_size, prompt)


def fused_layer(h: np.ndarray, w: LayerWeights, batch: RowBatch, heads: int, kv_heads: int, head_dim: int,
                k_cache: np.ndarray, v_cache: np.ndarray) -> None:
    """h: [T, D] float32 holding bf16 values, updated in place; k_cache, v_cache: [slots, KV, hd] bf16 bits."""
    project = _gemm if batch.prompt else _gemv
    T = h.shape[0]
    follow_torch_threads()
    normed = np.empty_like(h)
    _norm_rows(h, w.ln1, w.eps, normed)
    qkv = project(normed, w.qkv)
    attn = np.empty((T, heads * head_dim), np.float32)
    _attend(qkv, batch.cos, batch.sin, heads, kv_heads, head_dim, k_cache, v_cache, batch.write_slots, batch.tables,
            batch.lengths, batch.block_size, np.float32(head_dim ** -0.5), attn)
    _residual_norm(h, project(attn, w.o), w.ln2, w.eps, normed)
    gu = project(normed, w.gate_up)
    inter = w.down.weight.shape[1]
    m = np.empty((T, inter), np.float32)
    _silu_mul(gu, inter, m)
    _add_rows(h, project(m, w.down))


def norm_rows(h: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm of each row of h: [T, D] float32 holding bf16 values (the last stage's final norm)."""
    out = np.empty_like(h)
    _norm_rows(h, w, eps, out)
    return out
