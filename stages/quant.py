"""GGUF-quantized weight matrices computed with in place: the blocks as stored, never a float copy; and
the kernels every projection format shares (dense bf16/fp16/float32 weights are read as bytes too).

A :class:`QuantMatrix` holds a projection's weight [O, I] as its GGUF blocks (uint8 [O, bytes per row],
blocks running along I) and an optional float32 bias. The kernels (``Tiled``) decode rows of blocks into
small float32 buffers and use them at once:

* ``numba`` (``_tiles``): each thread takes a range of output rows, decodes four weight rows at a time into
  a [4, I] scratch and dots them with four input rows at a time (16 float32 sums in one vectorized loop),
  over blocks of input rows that stay in cache (a weight byte is read from memory once for decode's rows).
* ``numba-gemv`` (``_rows``): one weight row decoded, dotted with every input row: less arithmetic at one
  or two rows.
* ``torch-tile``: ``TILE_BYTES`` of decoded rows at a time in one float32 scratch buffer, reused for every
  tile, multiplied with torch's float32 GEMM. The tiles are decoded on the calling thread: a
  numba-parallel decode between torch GEMMs alternates two OpenMP pools, whose idle workers spin.

In the numba kernels every output value is a float32 dot product of a decoded row with an input row,
accumulated the same way whatever M, the thread split or its place in the tile: a row's result does not
depend on the batch (bit for bit). int8 (or bf16) activations would be faster but change the numbers; this
stays float32-exact. Measured (2-core AMD EPYC, AVX-512, one thread, a shared machine), Q4_0 1536x576:
M=1 0.17 ms (GEMV), M=16 0.43 ms (tile), M=256 5.4 ms (tile) / 5.6 ms (torch-tile); the decode is bound by
decoding, not by memory (~3 GB/s of blocks at one row).

Decoding is exact: every type's row decoder computes the same float32 operations in the same order as
``gguf.quants.dequantize`` (no fused multiply-add), so ``dequantize_rows`` equals gguf bit for bit. The
f16 block scales are read as two bytes and widened in the kernel: numba has no float16 on CPU, and
pre-converting them to float32 measured 3% faster for Q4_0 but would add 4 bytes per block (+22%).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gguf
import numpy as np
import torch
from numba import get_num_threads, njit, prange

from . import hugepages, int4pack, int8dot
from .int4pack import Int4Pack
from .tuning import DEFAULT_PICKS, MAX_ROWS, OWN_LAYOUT, follow_torch_threads

Q = gguf.GGMLQuantizationType
TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)  # kernel code = index
QUANTIZABLE = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)  # what gguf.quants.quantize can write
DENSE = {torch.bfloat16: ("bf16", 8), torch.float16: ("f16", 9), torch.float32: ("f32", 10)}  # format, kernel code
INT8 = int8dot.KERNEL  # activations quantized to int8, integer SIMD dot products
TILE_BYTES = 4 << 20  # float32 scratch of decoded rows per prefill tile


# --- decoding one row of blocks into float32 (exact, in gguf's order of operations) ---------------


@njit(inline="always")
def _f16(lo, hi) -> np.float32:  # IEEE half (two little-endian bytes) -> float32, exactly
    h = np.uint32(lo) | (np.uint32(hi) << np.uint32(8))
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    exp = (h >> np.uint32(10)) & np.uint32(0x1F)
    mant = h & np.uint32(0x3FF)
    if exp == 0:  # zero or subnormal: mant * 2^-24 is exact in float32
        v = np.float32(mant) * np.float32(2.0**-24)
        return -v if sign else v
    if exp == 31:  # inf / nan, payload kept
        return np.uint32(sign | np.uint32(0x7F800000) | (mant << np.uint32(13))).view(np.float32)
    return np.uint32(sign | ((exp + np.uint32(112)) << np.uint32(23)) | (mant << np.uint32(13))).view(np.float32)


@njit(inline="always")
def _u32(src, s) -> np.uint32:  # four little-endian bytes
    return (np.uint32(src[s]) | (np.uint32(src[s + 1]) << np.uint32(8)) | (np.uint32(src[s + 2]) << np.uint32(16))
            | (np.uint32(src[s + 3]) << np.uint32(24)))


@njit(cache=True, fastmath=False)
def _row_q8_0(src, out, block) -> None:  # block: d f16, 32 x int8; w = q * d
    for b in range(out.size // block):
        s, o = b * 34, b * 32
        d = _f16(src[s], src[s + 1])
        for j in range(block):
            out[o + j] = np.float32(np.int8(src[s + 2 + j])) * d


@njit(cache=True, fastmath=False)
def _row_q4_0(src, out, block) -> None:  # d f16, 16 bytes: element j low nibble, j + 16 high; w = d * (q - 8)
    for b in range(out.size // block):
        s, o = b * 18, b * 32
        d = _f16(src[s], src[s + 1])
        for j in range(block // 2):
            q = np.int32(src[s + 2 + j])
            out[o + j] = d * np.float32((q & 15) - 8)
            out[o + j + 16] = d * np.float32((q >> 4) - 8)


@njit(cache=True, fastmath=False)
def _row_q4_1(src, out, block) -> None:  # d, m f16, 16 bytes of nibbles; w = d * q + m
    for b in range(out.size // block):
        s, o = b * 20, b * 32
        d, m = _f16(src[s], src[s + 1]), _f16(src[s + 2], src[s + 3])
        for j in range(block // 2):
            q = np.int32(src[s + 4 + j])
            out[o + j] = d * np.float32(q & 15) + m
            out[o + j + 16] = d * np.float32(q >> 4) + m


@njit(cache=True, fastmath=False)
def _row_q5_0(src, out, block) -> None:  # d f16, qh u32 (bit j: 5th bit of element j), 16 bytes; w = d * (q - 16)
    for b in range(out.size // block):
        s, o = b * 22, b * 32
        d, qh = _f16(src[s], src[s + 1]), _u32(src, s + 2)
        for j in range(block // 2):
            q = np.int32(src[s + 6 + j])
            lo = (q & 15) | np.int32(((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4))
            hi = (q >> 4) | np.int32(((qh >> np.uint32(j + 16)) & np.uint32(1)) << np.uint32(4))
            out[o + j] = d * np.float32(lo - 16)
            out[o + j + 16] = d * np.float32(hi - 16)


@njit(cache=True, fastmath=False)
def _row_q5_1(src, out, block) -> None:  # d, m f16, qh u32, 16 bytes; w = d * q + m
    for b in range(out.size // block):
        s, o = b * 24, b * 32
        d, m, qh = _f16(src[s], src[s + 1]), _f16(src[s + 2], src[s + 3]), _u32(src, s + 4)
        for j in range(block // 2):
            q = np.int32(src[s + 8 + j])
            lo = (q & 15) | np.int32(((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4))
            hi = (q >> 4) | np.int32(((qh >> np.uint32(j + 16)) & np.uint32(1)) << np.uint32(4))
            out[o + j] = d * np.float32(lo) + m
            out[o + j + 16] = d * np.float32(hi) + m


@njit(inline="always")
def _scale_min_k4(src, s, j) -> tuple[np.float32, np.float32]:  # 6-bit scale and min of sub-block j (12 bytes at s)
    if j < 4:
        return np.float32(src[s + j] & 63), np.float32(src[s + j + 4] & 63)
    sc = (src[s + j + 4] & 15) | ((src[s + j - 4] >> 6) << 4)
    mn = (src[s + j + 4] >> 4) | ((src[s + j] >> 6) << 4)
    return np.float32(sc), np.float32(mn)


@njit(cache=True, fastmath=False)
def _row_q4_k(src, out, block) -> None:  # d, dmin f16, 12 bytes of scales/mins, 128 bytes: 8 sub-blocks of 32
    for b in range(out.size // block):
        s, o = b * 144, b * 256
        d, dmin = _f16(src[s], src[s + 1]), _f16(src[s + 2], src[s + 3])
        for c in range(4):  # 32 bytes: sub-block 2c in the low nibbles, 2c + 1 in the high ones
            sc0, m0 = _scale_min_k4(src, s + 4, 2 * c)
            sc1, m1 = _scale_min_k4(src, s + 4, 2 * c + 1)
            d0, dm0, d1, dm1 = d * sc0, dmin * m0, d * sc1, dmin * m1
            q0, o0 = s + 16 + 32 * c, o + 64 * c
            for j in range(block // 8):
                q = np.int32(src[q0 + j])
                out[o0 + j] = d0 * np.float32(q & 15) - dm0
                out[o0 + 32 + j] = d1 * np.float32(q >> 4) - dm1


@njit(cache=True, fastmath=False)
def _row_q5_k(src, out, block) -> None:  # as Q4_K plus 32 bytes qh (bit t of qh[j]: 5th bit of sub-block t, element j)
    for b in range(out.size // block):
        s, o = b * 176, b * 256
        d, dmin = _f16(src[s], src[s + 1]), _f16(src[s + 2], src[s + 3])
        for c in range(4):
            sc0, m0 = _scale_min_k4(src, s + 4, 2 * c)
            sc1, m1 = _scale_min_k4(src, s + 4, 2 * c + 1)
            d0, dm0, d1, dm1 = d * sc0, dmin * m0, d * sc1, dmin * m1
            q0, o0 = s + 48 + 32 * c, o + 64 * c
            for j in range(block // 8):
                q, h = np.int32(src[q0 + j]), np.int32(src[s + 16 + j])
                out[o0 + j] = d0 * np.float32((q & 15) | (((h >> (2 * c)) & 1) << 4)) - dm0
                out[o0 + 32 + j] = d1 * np.float32((q >> 4) | (((h >> (2 * c + 1)) & 1) << 4)) - dm1


@njit(cache=True, fastmath=False)
def _row_q6_k(src, out, block) -> None:  # ql 128, qh 64, 16 int8 scales (one per 16), d f16 last; w = d * sc * (q - 32)
    for b in range(out.size // block):
        s, o = b * 210, b * 256
        d = _f16(src[s + 208], src[s + 209])
        for half in range(2):  # 128 weights: 64 bytes of low nibbles/high nibbles, 32 bytes of 2-bit pairs
            ql, qh, sc, oh = s + 64 * half, s + 128 + 32 * half, s + 192 + 8 * half, o + 128 * half
            for g in range(4):  # weights 32g .. 32g + 31 of this half, two scales of 16
                lo_byte, shift = ql + 32 * (g & 1), 4 * (g >> 1)
                for k in range(2):
                    scale = d * np.float32(np.int8(src[sc + 2 * g + k]))
                    for j in range(block // 16 * k, block // 16 * (k + 1)):
                        q = ((np.int32(src[lo_byte + j]) >> shift) & 15) | (((np.int32(src[qh + j]) >> (2 * g)) & 3) << 4)
                        out[oh + 32 * g + j] = scale * np.float32(q - 32)


@njit(cache=True, fastmath=False)
def _row_bf16(src, out, block) -> None:  # dense bf16: two bytes per weight, widened by a shift
    bits = src.view(np.uint16)
    for i in range(out.size):
        out[i] = np.uint32(np.uint32(bits[i]) << np.uint32(16)).view(np.float32)


@njit(cache=True, fastmath=False)
def _row_f16(src, out, block) -> None:  # dense IEEE half
    for i in range(out.size):
        out[i] = _f16(src[2 * i], src[2 * i + 1])


@njit(cache=True, fastmath=False)
def _row_f32(src, out, block) -> None:  # dense float32
    vals = src.view(np.float32)
    for i in range(out.size):
        out[i] = vals[i]


@njit(cache=True, fastmath=False)
def _decode_row(kind, block, src, out) -> None:  # src: one row as stored (uint8); out: float32 [I]
    # ``block`` (weights per block, 32 or 256) reaches the decoders as a runtime value on purpose: their
    # inner loops then keep a trip count unknown to LLVM, which vectorizes them with a runtime alias check
    # instead of unrolling a constant 16 or 32 into scalar code (3x slower, measured).
    if kind == 0:
        _row_q8_0(src, out, block)
    elif kind == 1:
        _row_q4_0(src, out, block)
    elif kind == 2:
        _row_q4_1(src, out, block)
    elif kind == 3:
        _row_q5_0(src, out, block)
    elif kind == 4:
        _row_q5_1(src, out, block)
    elif kind == 5:
        _row_q4_k(src, out, block)
    elif kind == 6:
        _row_q5_k(src, out, block)
    elif kind == 7:
        _row_q6_k(src, out, block)
    elif kind == 8:
        _row_bf16(src, out, block)
    elif kind == 9:
        _row_f16(src, out, block)
    else:
        _row_f32(src, out, block)


# --- the kernels ----------------------------------------------------------------------------------


@njit(fastmath=True, cache=True)
def _dots(w, x, m, last, out, o, n) -> None:  # out[r, o + k] = w[k] . x[r], r = m..m+3 (up to last), k < n
    # Four decoded weight rows against four input rows: 16 FMAs per 8 loads. The sixteen float32 sums live
    # in one vectorized loop, so they are all accumulated the same way: a result does not depend on its
    # place in the tile (rows past ``last`` repeat it: computed, the same, and stored again).
    r1, r2, r3 = min(m + 1, last), min(m + 2, last), min(m + 3, last)
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
    c0 = c1 = c2 = c3 = d0 = d1 = d2 = d3 = np.float32(0.0)
    for i in range(x.shape[1]):
        w0, w1, w2, w3 = w[0, i], w[1, i], w[2, i], w[3, i]
        x0, x1, x2, x3 = x[m, i], x[r1, i], x[r2, i], x[r3, i]
        a0 += w0 * x0
        a1 += w1 * x0
        a2 += w2 * x0
        a3 += w3 * x0
        b0 += w0 * x1
        b1 += w1 * x1
        b2 += w2 * x1
        b3 += w3 * x1
        c0 += w0 * x2
        c1 += w1 * x2
        c2 += w2 * x2
        c3 += w3 * x2
        d0 += w0 * x3
        d1 += w1 * x3
        d2 += w2 * x3
        d3 += w3 * x3
    out[m, o], out[r1, o], out[r2, o], out[r3, o] = a0, b0, c0, d0
    if n > 1:
        out[m, o + 1], out[r1, o + 1], out[r2, o + 1], out[r3, o + 1] = a1, b1, c1, d1
    if n > 2:
        out[m, o + 2], out[r1, o + 2], out[r2, o + 2], out[r3, o + 2] = a2, b2, c2, d2
    if n > 3:
        out[m, o + 3], out[r1, o + 3], out[r2, o + 3], out[r3, o + 3] = a3, b3, c3, d3


@njit(parallel=True, nogil=True, fastmath=False, cache=True)
def _tiles(kind, block, blocks, x, out, tasks, rows_per_pass) -> None:  # blocks [O, row bytes]; x [M, I]; out [M, O]
    """out = x W^T, float32, unrounded. Each task (one per thread) takes a contiguous range of output rows;
    it decodes four weight rows at a time into a [4, I] scratch and dots them with ``rows_per_pass`` input
    rows (a block of x that stays in cache), four at a time. A weight byte is read from memory once per
    pass (once in all for decode's <= 16 rows)."""
    O, M = blocks.shape[0], x.shape[0]
    for t in prange(tasks):
        w = np.zeros((4, x.shape[1]), np.float32)  # up to four weight rows, decoded
        lo, hi = t * O // tasks, (t + 1) * O // tasks
        for m0 in range(0, M, rows_per_pass):
            m1 = min(M, m0 + rows_per_pass)
            for o in range(lo, hi, 4):
                n = min(4, hi - o)
                for k in range(n):
                    _decode_row(kind, block, blocks[o + k], w[k])
                for m in range(m0, m1, 4):
                    _dots(w, x, m, m1 - 1, out, o, n)


@njit(fastmath=True, cache=True)
def _dot(w, x) -> np.float32:  # one float32 sum, vectorized the same way for every row
    acc = np.float32(0.0)
    for i in range(x.shape[0]):
        acc += w[i] * x[i]
    return acc


@njit(parallel=True, nogil=True, fastmath=False, cache=True)
def _rows(kind, block, blocks, x, out, tasks) -> None:  # out[m, o] = w[o] . x[m]: one weight row at a time
    """The GEMV: each weight row decoded once into an [I] scratch (in L1) and dotted with every input row.
    Less arithmetic per output than ``_tiles`` (no tile to fill): faster at one or two rows."""
    O, M = blocks.shape[0], x.shape[0]
    for t in prange(tasks):
        w = np.empty(x.shape[1], np.float32)
        for o in range(t * O // tasks, (t + 1) * O // tasks):
            _decode_row(kind, block, blocks[o], w)
            for m in range(M):
                out[m, o] = _dot(w, x[m])


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _rows_bf16(bits, x, out) -> None:  # out[m, o] = w[o] . x[m], w bf16 bits [O, I] widened in the dot itself
    for o in prange(bits.shape[0]):
        row = bits[o]
        for m in range(x.shape[0]):
            xm = x[m]
            acc = np.float32(0.0)
            for i in range(xm.shape[0]):
                acc += np.uint32(np.uint32(row[i]) << np.uint32(16)).view(np.float32) * xm[i]
            out[m, o] = acc


@njit(nogil=True, fastmath=False, cache=True)
def _dequantize(kind, block, blocks, rows, out) -> None:  # out[r] = row rows[r] of the matrix, float32
    for r in range(rows.size):
        _decode_row(kind, block, blocks[rows[r]], out[r])


# --- what dense and quantized weights share --------------------------------------------------------


class Tiled:
    """A weight [O, I] that the tile kernel reads as stored (``_kernel_blocks``: uint8 [O, bytes per row],
    a read-only view, never a copy) and the candidate kernels that compute y = x W^T + b with it:

    * ``numba``: ``_tiles``, float32 sums in an order fixed by I alone: a row's bits never depend on the
      other rows, their number, or the thread count (decode and prompt rows alike).
    * ``torch-tile``: ``TILE_BYTES`` of weight rows decoded at a time into one scratch buffer, multiplied
      with torch's float32 GEMM (whether that is batch-invariant is the tuning's to check).
    * ``torch`` (dense weights, activations of the weight's dtype): torch's own F.linear.

    ``picks`` says which one runs for generated-token rows (``decode``) and prompt rows (``prefill``);
    ``stages.tuning.tune`` sets it by measurement. Until then both are ``numba``."""

    fmt: str  # "bf16", "f16", "f32" or the GGUF type's name
    shape: tuple[int, int]
    picks: dict[str, str]
    _kernel_blocks: np.ndarray
    _kind: int
    _block: int
    _bias32: np.ndarray | None  # [O] float32

    def candidates(self, kind: str, dtype: torch.dtype) -> tuple[str, ...]:
        """Kernels that may run rows of ``kind`` ("decode" or "prefill") for activations of ``dtype``."""
        return ("numba", "numba-gemv") if kind == "decode" else ("numba", "torch-tile")

    def settle(self) -> None:
        """Hold the weight in the layout its picks read (called once they are set): as it is, here."""

    def decode(self, x: np.ndarray) -> np.ndarray:
        """Generated-token rows: x [M, I] float32 -> [M, O] float32 (unrounded), batch-invariant."""
        return self.run(self.picks["decode"], x)

    def prefill(self, x: np.ndarray) -> np.ndarray:
        """Prompt rows: x [T, I] float32 -> [T, O] float32 (unrounded)."""
        return self.run(self.picks["prefill"], x)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The torch path: x [M, I] float32/bfloat16/float16 -> [M, O] in x's dtype. Up to MAX_ROWS rows
        by the decode pick, more by the prefill pick (a kernel not valid for x's dtype: the default one)."""
        O, I = self.shape
        if x.dim() != 2 or x.shape[1] != I:
            raise ValueError(f"input must be [rows, {I}]; got {list(x.shape)}")
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"input dtype must be float32, bfloat16 or float16; got {x.dtype}")
        kind = "decode" if x.shape[0] <= MAX_ROWS else "prefill"
        name, valid = self.picks[kind], self.candidates(kind, x.dtype)
        if name not in valid:
            name = DEFAULT_PICKS[kind] if DEFAULT_PICKS[kind] in valid else valid[0]
        if name == "torch":
            return self._torch(x.detach())
        return torch.from_numpy(self.run(name, x.detach().float().numpy())).to(x.dtype)

    def run(self, name: str, x: np.ndarray) -> np.ndarray:
        """x [M, I] float32 -> [M, O] float32 by the kernel ``name``."""
        x = np.ascontiguousarray(x, np.float32)
        if name == "numba":
            out = self._numba(x)
        elif name == "numba-gemv":
            out = self._numba(x, gemv=True)
        elif name == "torch-tile":
            out = self._torch_tile(x)
        elif name == "torch":
            return self._torch_numpy(x)
        else:
            raise ValueError(f"no kernel {name!r} for a {self.fmt} weight")
        if self._bias32 is not None:
            out += self._bias32
        return out

    def _torch(self, x: torch.Tensor) -> torch.Tensor:  # torch's own F.linear: dense weights only
        raise ValueError(f"no kernel 'torch' for a {self.fmt} weight")

    def _torch_numpy(self, x: np.ndarray) -> np.ndarray:
        raise ValueError(f"no kernel 'torch' for a {self.fmt} weight")

    def _numba(self, x: np.ndarray, gemv: bool = False) -> np.ndarray:  # [M, I] -> [M, O] float32, no bias
        O, I = self.shape
        out = np.empty((x.shape[0], O), np.float32)
        if x.shape[0] == 0:
            return out
        follow_torch_threads()
        if gemv and self._kind == DENSE[torch.bfloat16][1]:  # one pass over the bf16 bits, no scratch
            _rows_bf16(self._kernel_blocks.view(np.uint16), x, out)
        elif gemv:
            _rows(self._kind, self._block, self._kernel_blocks, x, out, get_num_threads())
        else:
            _tiles(self._kind, self._block, self._kernel_blocks, x, out, get_num_threads(), _rows_per_pass(I))
        return out

    def _torch_tile(self, x: np.ndarray) -> np.ndarray:  # [M, I] -> [M, O] float32, no bias
        O, I = self.shape
        tile = max(1, min(O, TILE_BYTES // (4 * I)))
        scratch = torch.empty(tile, I)  # [tile, I] decoded rows, reused for every tile
        xt = torch.from_numpy(x)
        out_t = torch.empty(O, x.shape[0])  # [O, M]: each tile's result is a contiguous slice
        for start in range(0, O, tile):
            n = min(tile, O - start)
            _dequantize(self._kind, self._block, self._kernel_blocks, np.arange(start, start + n), scratch[:n].numpy())
            torch.mm(scratch[:n], xt.T, out=out_t[start:start + n])
        return out_t.T.contiguous().numpy()

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of the weight as float32 [stop - start, I], exactly as gguf dequantizes them
        (held in torch's int4 layout: as the int4 kernel reads them, scales in bf16)."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"rows {start}:{stop} are outside 0:{self.shape[0]}")
        return self.take_rows(torch.arange(start, stop))

    def take_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows at ``ids`` (1-D, e.g. token ids for an embedding) as float32 [len(ids), I]."""
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"row ids must be a 1-D integer tensor; got {ids.dtype} {list(ids.shape)}")
        rows = ids.to(torch.int64).numpy()
        if rows.size and not (0 <= rows.min() and rows.max() < self.shape[0]):
            raise ValueError(f"row ids must be in 0:{self.shape[0]}; got {int(rows.min())}..{int(rows.max())}")
        return torch.from_numpy(self._row_values(rows))

    def _row_values(self, rows: np.ndarray) -> np.ndarray:  # [n] int64 -> float32 [n, I]
        out = np.empty((rows.size, self.shape[1]), np.float32)
        _dequantize(self._kind, self._block, self._kernel_blocks, rows, out)
        return out


def _rows_per_pass(in_features: int) -> int:
    """Input rows per pass over the weight: ~128 KiB of them (they stay in cache), at least MAX_ROWS (so
    decode reads every weight byte once), a multiple of four (the tile)."""
    return max(MAX_ROWS, (32768 // in_features) // 4 * 4)


def read_only(a: np.ndarray) -> np.ndarray:
    """A read-only plain-ndarray view (one compiled kernel for every weight, memory-mapped or not)."""
    view = np.asarray(a).view()
    view.flags.writeable = False
    return view


def float32_bias(bias: torch.Tensor | np.ndarray | None, out_features: int) -> np.ndarray | None:
    if bias is None:
        return None
    b = bias.detach().float().numpy() if isinstance(bias, torch.Tensor) else np.asarray(bias, np.float32)
    if b.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},); got {b.shape}")
    return np.ascontiguousarray(b, np.float32)


# --- the matrix -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class QuantMatrix(Tiled):
    """A weight [O, I] as GGUF blocks: ``blocks`` uint8 [O, bytes per row], used as given (never copied),
    and an optional float32 bias [O]."""

    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, int]  # (out_features O, in_features I)
    blocks: np.ndarray
    bias: np.ndarray | torch.Tensor | None = None
    picks: dict[str, str] = field(init=False, repr=False, default_factory=lambda: dict(DEFAULT_PICKS))
    _kernel_blocks: np.ndarray = field(init=False, repr=False)
    _bias32: np.ndarray | None = field(init=False, repr=False)
    # the weight in an own-layout kernel's layout (``OWN_LAYOUT``): made while kernels are measured, only the picked
    # one kept by ``settle``, which then drops the blocks
    _packed: dict[str, Int4Pack | np.ndarray] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.qtype not in TYPES:
            raise ValueError(f"GGUF type {getattr(self.qtype, 'name', self.qtype)} is not supported; "
                             f"supported: {', '.join(t.name for t in TYPES)}")
        object.__setattr__(self, "qtype", Q(self.qtype))
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"shape must be (out_features, in_features), both positive; got {self.shape}")
        O, I = (int(n) for n in self.shape)
        object.__setattr__(self, "shape", (O, I))
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        if I % block:
            raise ValueError(f"in_features {I} is not a multiple of the {self.qtype.name} block size {block}")
        want = (O, I // block * size)
        b = self.blocks
        if not isinstance(b, np.ndarray) or b.dtype != np.uint8 or b.shape != want:
            described = f"{b.dtype} array {b.shape}" if isinstance(b, np.ndarray) else type(b).__name__
            raise ValueError(f"{self.qtype.name} weight {O}x{I} needs uint8 blocks of shape {want} "
                             f"({size} bytes per {block} weights); got {described}")
        if not b.flags.c_contiguous:
            raise ValueError("blocks must be C-contiguous (the tensor's bytes as stored), not a strided view")
        object.__setattr__(self, "_kernel_blocks", read_only(b))
        object.__setattr__(self, "_bias32", float32_bias(self.bias, O))

    @classmethod
    def quantize(cls, weight: torch.Tensor | np.ndarray, qtype: gguf.GGMLQuantizationType,
                 bias: torch.Tensor | np.ndarray | None = None) -> QuantMatrix:
        """Quantize a float weight [O, I] with ``gguf.quants.quantize`` (for checkpoints quantized at load)."""
        if qtype not in QUANTIZABLE:
            raise ValueError(f"cannot quantize to {getattr(qtype, 'name', qtype)}: gguf can write "
                             f"{', '.join(t.name for t in QUANTIZABLE)}")
        w = weight.detach().float().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight, np.float32)
        if w.ndim != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features]; got shape {w.shape}")
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if w.shape[1] % block:
            raise ValueError(f"in_features {w.shape[1]} is not a multiple of the {qtype.name} block size {block}")
        return cls(qtype, w.shape, gguf.quants.quantize(w, qtype), bias)

    @classmethod
    def from_reader_tensor(cls, tensor: gguf.ReaderTensor) -> QuantMatrix:
        """A 2-D tensor of a ``gguf.GGUFReader`` (its data a view of the memory-mapped file, kept as is)."""
        if len(tensor.shape) != 2:
            raise ValueError(f"tensor {tensor.name} has shape {list(tensor.shape)}; a weight matrix is 2-D")
        in_features, out_features = (int(n) for n in tensor.shape)  # ggml order: fastest dimension first
        return cls(tensor.tensor_type, (out_features, in_features), tensor.data)

    @property
    def fmt(self) -> str:
        return self.qtype.name

    @property
    def nbytes(self) -> int:
        """Bytes as held (blocks or an own-layout kernel's copy of them, and bias)."""
        held = self.blocks.nbytes + sum(p.nbytes for p in self._packed.values())
        return held + (0 if self._bias32 is None else self._bias32.nbytes)

    @property
    def repacked(self) -> bool:  # held in an own-layout kernel's layout, the blocks gone
        return self.blocks.size == 0

    def candidates(self, kind: str, dtype: torch.dtype) -> tuple[str, ...]:
        if self.repacked:
            return tuple(self._packed)
        more = (int4pack.KERNEL,) if int4pack.eligible(self.qtype, self.shape, dtype) else ()
        if dtype == torch.bfloat16 and int8dot.available(self.qtype, self.shape):
            more += (INT8,)  # not the exact product (int8 activations): bf16 runs only
        return super().candidates(kind, dtype) + more

    def run(self, name: str, x: np.ndarray) -> np.ndarray:
        if name not in OWN_LAYOUT:
            return super().run(name, x)
        if name == INT8:
            out = int8dot.matmul(self.qtype, self._layout(name), x)
        else:
            x16 = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16)  # bf16 values: exact
            out = self._layout(name).mm(x16).float().numpy()
        return out if self._bias32 is None else out + self._bias32

    def settle(self) -> None:
        """Hold the weight in the layout its picks read: an own-layout kernel's (the blocks dropped) when one was
        picked, else the blocks (copies made while measuring dropped)."""
        picked = set(self.picks.values()) & set(OWN_LAYOUT)
        for name in set(self._packed) - picked:
            del self._packed[name]
        if not picked:
            return
        if len(set(self.picks.values())) != 1:
            raise ValueError(f"the {' and '.join(sorted(picked))} kernel holds the weight in its own layout: every "
                             f"row kind must use it; got {self.picks}")
        if not self.repacked:
            name = picked.pop()
            made = self._layout(name)
            self._packed[name] = read_only(hugepages.held(made)) if name == INT8 else made.held()
            empty = np.empty((self.shape[0], 0), np.uint8)
            object.__setattr__(self, "blocks", empty)
            object.__setattr__(self, "_kernel_blocks", read_only(empty))

    def int8_operands(self) -> tuple[int, np.ndarray, np.ndarray]:
        """What the int8 kernel reads, for a caller that runs it inside its own numba code: the format's index
        in ``int8dot.FORMATS``, the tiles (``int8dot.repack``) and the float32 bias ([0] if none)."""
        bias = np.empty(0, np.float32) if self._bias32 is None else self._bias32
        return int8dot.FORMATS.index(self.qtype), self._layout(INT8), bias

    def _layout(self, name: str) -> Int4Pack | np.ndarray:
        if name not in self._packed:
            if self.repacked:
                raise ValueError(f"the weight is held in the {next(iter(self._packed))} layout, not {name}'s")
            made = (read_only(int8dot.repack(self.qtype, self.blocks)) if name == INT8
                    else Int4Pack.from_blocks(self.qtype, self.blocks))
            self._packed[name] = made
        return self._packed[name]

    def _row_values(self, rows: np.ndarray) -> np.ndarray:
        if not self.repacked:
            return super()._row_values(rows)
        if int4pack.KERNEL in self._packed:
            return self._packed[int4pack.KERNEL].rows(rows)
        blocks = int8dot.unpack_rows(self.qtype, self._packed[INT8], rows)
        out = np.empty((rows.size, self.shape[1]), np.float32)
        _dequantize(self._kind, self._block, blocks, np.arange(rows.size), out)
        return out

    @property
    def _kind(self) -> int:
        return TYPES.index(self.qtype)

    @property
    def _block(self) -> int:
        return gguf.GGML_QUANT_SIZES[self.qtype][0]
