"""bf16 weights times bf16 activations by the CPU's own bf16 dot product (AVX-512 BF16 ``vdpbf16ps``: 32 products
of bf16 pairs summed into 16 float32 lanes an instruction), for dense bf16 weights as stored (no copy, no widening
in memory). Tiles of 4 weight rows x 4 activation rows keep 16 accumulators in registers, so each weight byte is
read once per 4 activation rows; a weight row and an activation row give one float32 sum in a fixed order (16
lanes over the row's 32-wide chunks, then a fixed halving tree, done for all of a tile's sums at once) whatever
tile computes them, so a row's result does not depend on the other rows (every tile does the same adds per pair).

Not the numba kernels' arithmetic (they widen bf16 to float32 and fma one product at a time): ``vdpbf16ps`` adds
two products before the accumulator and flushes denormals, so it is offered for bf16 activations only, as one more
candidate the tuning measures. LLVM IR written with llvmlite inside numba intrinsics, as ``stages.int8dot``.

``fma`` (``matmul_fma``, any CPU with AVX-512): the same tiles for bf16 or fp16 weights times float32 activations,
16 weights widened to float32 in a register (bf16: a shift; fp16: ``vcvtph2ps``) and multiplied-added exactly
(``fma``) into 16 lanes, then the same lane tree: float32 sums like the numba kernels', in another fixed order.
Each weight register serves 4 activation rows and each activation register 4 weight rows (the numba GEMV widens
every weight once per row and reads two operands per product): SmolLM2's projections at 16 rows 2-5x faster than
``numba-gemv``, 1.5-2x than the numba tile kernel; at 1 row as fast or faster (2-core Xeon, AVX-512 without BF16).
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import fn, index, reduce_lanes

KERNEL = "bf16dot"  # its name among the kernels the tuning picks from
CHUNK = 32  # bf16 values per instruction
FMA_CHUNK = 16  # float32 lanes per fma (``FMA_KERNEL``)
TILE = 4  # weight rows and activation rows per tile

_I8, _I32, _F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
_V16F, _V16I = ir.VectorType(_F32, 16), ir.VectorType(_I32, 16)


class _BFloat(ir.Type):  # llvmlite has no bfloat type; LLVM's intrinsic takes <32 x bfloat>
    def _to_string(self) -> str:
        return "bfloat"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _BFloat)

    def __hash__(self) -> int:
        return hash("bfloat")


_V32BF = ir.VectorType(_BFloat(), 32)
SUPPORTED = "+avx512bf16" in llvm_binding.get_host_cpu_features().flatten().split(",")


FMA_KERNEL = "fma"  # bf16/fp16 weights widened in registers times float32 activations, in the same tiles
FMA_SUPPORTED = "+avx512f" in llvm_binding.get_host_cpu_features().flatten().split(",")


def fma_available(shape: tuple[int, int]) -> bool:
    """Whether ``matmul_fma`` can run a half weight of ``shape`` (O, I) here: AVX-512, rows of whole 16-value chunks."""
    return FMA_SUPPORTED and shape[1] % FMA_CHUNK == 0


def available(shape: tuple[int, int]) -> bool:
    """Whether a bf16 weight of ``shape`` (O, I) can run here: AVX-512 BF16, rows of whole 32-value chunks."""
    return SUPPORTED and shape[1] % CHUNK == 0


def _tile(R: int, C: int, prefetch: bool = False, widen: str | None = None):
    """An intrinsic tile(w, rb, x, xb, n, out, ob): R weight rows (bf16 bits at ``w``, ``rb`` bytes apart) times C
    activation rows (at ``x``, ``xb`` bytes apart), ``n`` chunks (of 32, or 16 with ``widen``); out[c, r] (float32 at ``out``, rows ``ob``
    bytes apart). ``prefetch``: ask for the next R rows' chunk with each chunk (the 4 rows read side by side
    stream from memory slower than one row: measured, a 49152x576 weight at 16 rows 4.8 -> 3.3 ms). ``widen``
    ("bf16" or "f16"): chunks of 16 half weights widened to float32 times 16 float32 activations by fma
    (``matmul_fma``) instead of 32 bf16 pairs by ``vdpbf16ps``."""

    def codegen(context, builder, signature, args):
        w, rb, x, xb, n, out, ob = args
        fma = widen is not None
        if fma:
            fma_ = fn(builder, "llvm.fma.v16f32", _V16F, [_V16F] * 3)
            dot = lambda total, wv, xv: builder.call(fma_, [wv, xv, total])  # noqa: E731
        else:
            dpbf = fn(builder, "llvm.x86.avx512bf16.dpbf16ps.512", _V16F, [_V16F, _V32BF, _V32BF])
            dot = lambda total, wv, xv: builder.call(dpbf, [total, wv, xv])  # noqa: E731
        step = 2 * (FMA_CHUNK if fma else CHUNK)  # weight bytes a chunk (activation bytes: 64 either way)
        acc = [[cgutils.alloca_once_value(builder, ir.Constant(_V16F, None)) for _ in range(C)] for _ in range(R)]

        def at_(base, stride, i, k, size):
            return builder.add(builder.add(base, builder.mul(stride, ir.Constant(stride.type, i))),
                               builder.mul(k, ir.Constant(k.type, size)))

        def wvec(i, k):  # chunk k of weight row i
            if widen == "f16":  # 16 fp16 converted to float32 (exact)
                half = builder.load(builder.inttoptr(at_(w, rb, i, k, step), ir.VectorType(ir.HalfType(), 16).as_pointer()), align=1)
                return builder.fpext(half, _V16F)
            if widen == "bf16":  # 16 bf16 widened to float32: the bits shifted into the high half
                bits = builder.load(builder.inttoptr(at_(w, rb, i, k, step), ir.VectorType(ir.IntType(16), 16).as_pointer()), align=1)
                wide = builder.shl(builder.zext(bits, _V16I), ir.Constant(_V16I, [16] * 16))
                return builder.bitcast(wide, _V16F)
            return builder.bitcast(builder.load(builder.inttoptr(at_(w, rb, i, k, step), _V16I.as_pointer()), align=1), _V32BF)

        def xvec(i, k):  # chunk k of activation row i
            v = builder.load(builder.inttoptr(at_(x, xb, i, k, 64), _V16I.as_pointer()), align=1)
            return builder.bitcast(v, _V16F if fma else _V32BF)

        ahead = fn(builder, "llvm.prefetch.p0", ir.VoidType(), [_I8.as_pointer()] + [_I32] * 3)
        with cgutils.for_range(builder, n) as loop:
            for r in range(R if prefetch else 0):  # the next tile's rows (a prefetch past the end is harmless)
                at = builder.add(builder.add(w, builder.mul(rb, ir.Constant(rb.type, R + r))),
                                 builder.mul(loop.index, ir.Constant(loop.index.type, step)))
                builder.call(ahead, [builder.inttoptr(at, _I8.as_pointer()), *(ir.Constant(_I32, v) for v in (0, 3, 1))])
            ws = [wvec(r, loop.index) for r in range(R)]
            xs = [xvec(c, loop.index) for c in range(C)]
            for r in range(R):
                for c in range(C):
                    builder.store(dot(builder.load(acc[r][c]), ws[r], xs[c]), acc[r][c])
        sums = reduce_lanes(builder, [builder.load(acc[r][c]) for c in range(C) for r in range(R)], 16)  # lane c * R + r
        for c in range(C):
            row = builder.shuffle_vector(sums, sums, index(range(c * R, c * R + R)))
            at = builder.add(out, builder.mul(ob, ir.Constant(ob.type, c)))
            builder.store(row, builder.inttoptr(at, ir.VectorType(_F32, R).as_pointer()), align=4)
        return context.get_dummy_value()

    @intrinsic
    def tile(typingctx, w, rb, x, xb, n, out, ob):
        return types.none(*[types.intp] * 7), codegen

    return tile


_t44, _t14, _t11 = _tile(TILE, TILE, prefetch=True), _tile(1, TILE), _tile(1, 1)  # compiled where called
_b44, _b41, _b14, _b11 = (_tile(TILE, TILE, True, "bf16"), _tile(TILE, 1, True, "bf16"), _tile(1, TILE, widen="bf16"),
                          _tile(1, 1, widen="bf16"))
_h44, _h41, _h14, _h11 = (_tile(TILE, TILE, True, "f16"), _tile(TILE, 1, True, "f16"), _tile(1, TILE, widen="f16"),
                          _tile(1, 1, widen="f16"))


@njit(parallel=True, boundscheck=False, fastmath=False, cache=True)
def _matmul(w, x, out) -> None:  # w uint16 [O, I], x uint16 [M, I] (bf16 bits) -> out float32 [M, O]
    O, I, M = w.shape[0], w.shape[1], x.shape[0]
    n, rb, xb, ob = I // CHUNK, w.strides[0], x.strides[0], out.strides[0]
    wa, xa, oa = w.ctypes.data, x.ctypes.data, out.ctypes.data
    full, groups = M // TILE * TILE, (O + TILE - 1) // TILE
    for g in prange(groups):
        o = g * TILE
        for c in range(0, full, TILE):
            if o + TILE <= O:
                _t44(wa + o * rb, rb, xa + c * xb, xb, n, oa + c * ob + o * 4, ob)
            else:
                for r in range(o, O):
                    _t14(wa + r * rb, rb, xa + c * xb, xb, n, oa + c * ob + r * 4, ob)
        for r in range(o, min(o + TILE, O)):  # the last M % 4 rows: one weight row at a time, read in order
            for c in range(full, M):
                _t11(wa + r * rb, rb, xa + c * xb, xb, n, oa + c * ob + r * 4, ob)


@njit(inline="always")
def _fma_tile(f16, rows4, cols4, args) -> None:  # 4 (else 1) weight rows x 4 (else 1) activation rows, fp16 or bf16
    if f16:
        if rows4:
            if cols4:
                _h44(*args)
            else:
                _h41(*args)
        elif cols4:
            _h14(*args)
        else:
            _h11(*args)
    elif rows4:
        if cols4:
            _b44(*args)
        else:
            _b41(*args)
    elif cols4:
        _b14(*args)
    else:
        _b11(*args)


@njit(parallel=True, boundscheck=False, fastmath=False, cache=True)
def _matmul_fma(w, x, out, f16) -> None:  # w uint16 [O, I] (bf16 or, if f16, fp16 bits), x float32 [M, I] -> out [M, O]
    O, I, M = w.shape[0], w.shape[1], x.shape[0]
    n, rb, xb, ob = I // FMA_CHUNK, w.strides[0], x.strides[0], out.strides[0]
    wa, xa, oa = w.ctypes.data, x.ctypes.data, out.ctypes.data
    for g in prange((O + TILE - 1) // TILE):
        o = g * TILE
        rows4 = o + TILE <= O  # else the last O % 4 weight rows, one at a time
        c = 0
        while c < M:  # 4 activation rows at a time, then the last M % 4 one at a time
            cols4 = c + TILE <= M
            for r in range(o, o + 1 if rows4 else O):
                _fma_tile(f16, rows4, cols4, (wa + r * rb, rb, xa + c * xb, xb, n, oa + c * ob + r * 4, ob))
            c += TILE if cols4 else 1


def matmul_fma(bits: np.ndarray, x: np.ndarray, f16: bool = False) -> np.ndarray:
    """bits: a bf16 (or, ``f16``, fp16) weight's bits uint16 [O, I] (C-contiguous); x: [M, I] float32 -> [M, O]
    float32."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty((x.shape[0], bits.shape[0]), np.float32)
    if x.shape[0]:
        _matmul_fma(bits, x, out, f16)
    return out


def matmul(bits: np.ndarray, x: np.ndarray) -> np.ndarray:
    """bits: a bf16 weight's bits uint16 [O, I] (C-contiguous); x: [M, I] float32 (rounded to bf16 first, to
    nearest even) -> [M, O] float32."""
    xb = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16).view(torch.uint16).numpy()
    out = np.empty((x.shape[0], bits.shape[0]), np.float32)
    if x.shape[0]:
        _matmul(bits, xb, out)
    return out
