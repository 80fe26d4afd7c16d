"""bf16 weights times bf16 activations by the CPU's own bf16 dot product (AVX-512 BF16 ``vdpbf16ps``: 32 products
of bf16 pairs summed into 16 float32 lanes an instruction), for dense bf16 weights as stored (no copy, no widening
in memory). Tiles of 4 weight rows x 4 activation rows keep 16 accumulators in registers, so each weight byte is
read once per 4 activation rows; a weight row and an activation row give one float32 sum in a fixed order (16
lanes over the row's 32-wide chunks, then a fixed halving tree, done for all of a tile's sums at once) whatever
tile computes them, so a row's result does not depend on the other rows (every tile does the same adds per pair).

Not the numba kernels' arithmetic (they widen bf16 to float32 and fma one product at a time): ``vdpbf16ps`` adds
two products before the accumulator and flushes denormals, so it is offered for bf16 activations only, as one more
candidate the tuning measures. LLVM IR written with llvmlite inside numba intrinsics, as ``stages.int8dot``.
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


def available(shape: tuple[int, int]) -> bool:
    """Whether a bf16 weight of ``shape`` (O, I) can run here: AVX-512 BF16, rows of whole 32-value chunks."""
    return SUPPORTED and shape[1] % CHUNK == 0


def _tile(R: int, C: int, prefetch: bool = False):
    """An intrinsic tile(w, rb, x, xb, n, out, ob): R weight rows (bf16 bits at ``w``, ``rb`` bytes apart) times C
    activation rows (at ``x``, ``xb`` bytes apart), ``n`` chunks of 32; out[c, r] (float32 at ``out``, rows ``ob``
    bytes apart). ``prefetch``: ask for the next R rows' chunk with each chunk (the 4 rows read side by side
    stream from memory slower than one row: measured, a 49152x576 weight at 16 rows 4.8 -> 3.3 ms)."""

    def codegen(context, builder, signature, args):
        w, rb, x, xb, n, out, ob = args
        dot = fn(builder, "llvm.x86.avx512bf16.dpbf16ps.512", _V16F, [_V16F, _V32BF, _V32BF])
        acc = [[cgutils.alloca_once_value(builder, ir.Constant(_V16F, None)) for _ in range(C)] for _ in range(R)]

        def vec(base, stride, i, k):  # chunk k of row i
            at = builder.add(builder.add(base, builder.mul(stride, ir.Constant(stride.type, i))),
                             builder.mul(k, ir.Constant(k.type, 2 * CHUNK)))
            return builder.bitcast(builder.load(builder.inttoptr(at, _V16I.as_pointer()), align=1), _V32BF)

        ahead = fn(builder, "llvm.prefetch.p0", ir.VoidType(), [_I8.as_pointer()] + [_I32] * 3)
        with cgutils.for_range(builder, n) as loop:
            for r in range(R if prefetch else 0):  # the next tile's rows (a prefetch past the end is harmless)
                at = builder.add(builder.add(w, builder.mul(rb, ir.Constant(rb.type, R + r))),
                                 builder.mul(loop.index, ir.Constant(loop.index.type, 2 * CHUNK)))
                builder.call(ahead, [builder.inttoptr(at, _I8.as_pointer()), *(ir.Constant(_I32, v) for v in (0, 3, 1))])
            ws = [vec(w, rb, r, loop.index) for r in range(R)]
            xs = [vec(x, xb, c, loop.index) for c in range(C)]
            for r in range(R):
                for c in range(C):
                    builder.store(builder.call(dot, [builder.load(acc[r][c]), ws[r], xs[c]]), acc[r][c])
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


def matmul(bits: np.ndarray, x: np.ndarray) -> np.ndarray:
    """bits: a bf16 weight's bits uint16 [O, I] (C-contiguous); x: [M, I] float32 (rounded to bf16 first, to
    nearest even) -> [M, O] float32."""
    xb = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16).view(torch.uint16).numpy()
    out = np.empty((x.shape[0], bits.shape[0]), np.float32)
    if x.shape[0]:
        _matmul(bits, xb, out)
    return out
