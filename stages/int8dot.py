"""Integer dot products of GGUF blocks with int8-quantized activations (llama.cpp's ``vec_dot_q4_0_q8_0`` idea):
each activation row is quantized to int8 in blocks of 32 (one float32 scale per block, ``quantize_rows``), and a
weight block times an activation block is one integer dot product of 32 bytes, done by the CPU's integer SIMD:
AVX-512 VNNI ``vpdpbusd`` on 64 bytes (two weight rows an instruction) where the CPU has it, AVX-VNNI on 32,
else AVX2 ``vpmaddubsw`` + ``vpmaddwd``: the same integer sums, the same float math in the same order, the same
bits on every one (tested). The code is LLVM IR written with llvmlite inside numba intrinsics (numba's own loops
do not vectorize this to ``vpdpbusd``).

The weight is held as tiles of ``ROWS`` rows (``repack``: for each block column, the 8 rows' scales, then their
quants: the blocks' bytes moved, none added), so 8 scales load as one vector; the 4-bit quants are unpacked in
registers; nothing is expanded in memory. A weight row and an activation row give one float32 sum in a fixed
order (8 lanes per block, one fma each, then a fixed tree), so a row's result does not depend on the other rows.

This is not the exact dequantized product: the activations lose precision (int8 per block of 32, as in
llama.cpp); ``QuantMatrix`` offers it as a kernel for bf16 activations only (float32 runs stay exact).

Formats: Q4_0 (w = d (q - 8)), Q4_1 (w = d q + m), Q8_0 (w = d q). For a block b of row o and activation block
with scale dx, sum sx = dx * sum(qx): Q4_0 adds d dx dot(q, qx) - 8 d sx; Q4_1 d dx dot(q, qx) + m sx; Q8_0
d dx dot(q, qx) (signed bytes: |q| times qx with q's sign, the unsigned-by-signed instruction's operands).

Measured on a 2-core AMD EPYC (Zen 4: avx2 avx512f/bw/vl avx512_vnni avx512_bf16), 2 threads, one activation
row, microseconds per call (torch's int4 kernel with bf16 activations in brackets): Q4_1 3072x576 29-40 (62),
576x1536 20-27 (43); Q4_0 2048x5632 ~300 (562); Q8_0 49152x576 (SmolLM2's tied lm_head) ~600-850 (the numba
float kernel: ~2600). From 4 rows on torch's int4 kernel is as fast or faster (it shares the unpacking between
rows; this kernel does not): the tuning weighs both (time per row, summed over 1, 4 and 16 rows).
"""

from __future__ import annotations

import gguf
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import fn, index, reduce_lanes

Q = gguf.GGMLQuantizationType
BLOCK = 32  # weights per block, and activations per int8 block
FORMATS = (Q.Q4_0, Q.Q4_1, Q.Q8_0)
KERNEL = "int8"  # its name among the kernels the tuning picks from
_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}  # block bytes: f16 d [, f16 m], then the quants

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_V16I8, _V32I8, _V16I16 = ir.VectorType(_I8, 16), ir.VectorType(_I8, 32), ir.VectorType(_I16, 16)
_V8I32, _V8F32 = ir.VectorType(_I32, 8), ir.VectorType(_F32, 8)
_V64I8, _V16I32 = ir.VectorType(_I8, 64), ir.VectorType(_I32, 16)
_FALSE = ir.Constant(ir.IntType(1), 0)


def cpu_has() -> str | None:
    """The integer SIMD this machine's code can use: "vnni512" (AVX-512 VNNI, 64 bytes an instruction), "vnni"
    (32 bytes), "avx2", or None (no kernel here)."""
    features = set(f[1:] for f in llvm_binding.get_host_cpu_features().flatten().split(",") if f.startswith("+"))
    if {"avx512vnni", "avx512bw", "avx512vl", "avx2"} <= features:
        return "vnni512"
    if {"avx512vnni", "avx512vl", "avx2"} <= features or {"avxvnni", "avx2"} <= features:
        return "vnni"
    return "avx2" if "avx2" in features else None


SIMD = cpu_has()


def available(qtype: gguf.GGMLQuantizationType, shape: tuple[int, int]) -> bool:
    """Whether a ``qtype`` weight of ``shape`` (O, I) can run here (whole tiles of ROWS rows)."""
    return SIMD is not None and qtype in FORMATS and shape[1] % BLOCK == 0 and shape[0] % ROWS == 0


def _splat(builder: ir.IRBuilder, value: ir.Value, vtype: ir.VectorType) -> ir.Value:
    one = builder.insert_element(ir.Constant(vtype, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vtype, None), index([0] * vtype.count))


def _dot(builder: ir.IRBuilder, unsigned: ir.Value, signed: ir.Value) -> ir.Value:
    """<32 x u8> . <32 x i8> -> <8 x i32>: lane k = the sum of bytes 4k..4k+3's products."""
    zero = ir.Constant(_V8I32, None)
    if SIMD in ("vnni", "vnni512"):
        f = fn(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32, [_V8I32, _V8I32, _V8I32])
        return builder.call(f, [zero, builder.bitcast(unsigned, _V8I32), builder.bitcast(signed, _V8I32)])
    pairs = builder.call(fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8]), [unsigned, signed])
    ones = ir.Constant(_V16I16, [1] * 16)
    return builder.call(fn(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16]), [pairs, ones])


def _half(builder: ir.IRBuilder, ptr: ir.Value) -> ir.Value:  # f16 at a byte address -> float
    return builder.fpext(builder.load(builder.bitcast(ptr, ir.HalfType().as_pointer()), align=1), _F32)


ROWS = 8  # weight rows per tile: their scales are read as one vector, their sums kept in 8 accumulators
_FIELDS = {Q.Q4_0: ((0, 2), (2, 18)), Q.Q4_1: ((0, 2), (2, 4), (4, 20)), Q.Q8_0: ((0, 2), (2, 34))}  # d, [m,] quants


def repack(qtype: gguf.GGMLQuantizationType, blocks: np.ndarray, rows_per_chunk: int = 4096) -> np.ndarray:
    """blocks uint8 [O, nb * size] -> tiles uint8 [O / ROWS, nb * ROWS * size]: for each group of ROWS rows and
    each block column, the ROWS rows' d (f16), then their m (Q4_1), then their quants: the same bytes, moved."""
    O, size = blocks.shape[0], _BYTES[qtype]
    nb = blocks.shape[1] // size
    out = np.empty((O // ROWS, nb * ROWS * size), np.uint8)
    step = max(ROWS, rows_per_chunk // ROWS * ROWS)
    for r in range(0, O, step):
        part = blocks[r:r + step].reshape(-1, ROWS, nb, size).transpose(0, 2, 1, 3)  # [g, nb, ROWS, size]
        fields = [part[..., a:b].reshape(part.shape[0], nb, -1) for a, b in _FIELDS[qtype]]
        out[r // ROWS:(r + step) // ROWS] = np.concatenate(fields, axis=-1).reshape(part.shape[0], -1)
    return out


def unpack_rows(qtype: gguf.GGMLQuantizationType, tiles: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` of a ``repack``ed weight as their blocks: uint8 [len(ids), nb * size]."""
    size = _BYTES[qtype]
    nb = tiles.shape[1] // (ROWS * size)
    t = tiles[ids // ROWS].reshape(len(ids), nb, ROWS * size)
    r, fields, at = ids % ROWS, [], 0
    for a, b in _FIELDS[qtype]:
        w = b - a
        f = t[:, :, at:at + ROWS * w].reshape(len(ids), nb, ROWS, w)
        fields.append(f[np.arange(len(ids)), :, r])  # [n, nb, w]
        at += ROWS * w
    return np.ascontiguousarray(np.concatenate(fields, axis=-1).reshape(len(ids), nb * size))


def _tile_dot(qtype: gguf.GGMLQuantizationType):
    """An intrinsic tile_dot(w, x, dx, sx, nb, out): ROWS weight rows (``nb`` tiles at address ``w``) times one
    quantized activation row (int8 at ``x``, float32 block scales ``dx`` and scaled sums ``sx``), the ROWS float32
    results stored at ``out``. Each row sums its blocks in 8 lanes (one fma per block), then a fixed tree."""
    size, fields = _BYTES[qtype], _FIELDS[qtype]
    tile, qoff, qbytes = ROWS * size, ROWS * fields[-1][0], fields[-1][1] - fields[-1][0]
    V8H = ir.VectorType(ir.HalfType(), ROWS)

    def at(builder, ptr, offset, vtype):
        return builder.load(builder.bitcast(builder.gep(ptr, [ir.Constant(_I32, offset)]), vtype.as_pointer()), align=1)

    def _rows8(builder, tp, xv) -> list:  # <8 x i32> per row: lane k = the sum of the products of bytes 4k..4k+3
        out = []
        for r in range(ROWS):
            if qtype == Q.Q8_0:
                q = at(builder, tp, qoff + r * qbytes, _V32I8)
                absq = builder.call(fn(builder, "llvm.abs.v32i8", _V32I8, [_V32I8, ir.IntType(1)]), [q, _FALSE])
                out.append(_dot(builder, absq, builder.call(fn(builder, "llvm.x86.avx2.psign.b", _V32I8, [_V32I8, _V32I8]), [xv, q])))
            else:
                q = at(builder, tp, qoff + r * qbytes, _V16I8)
                lo, hi = builder.and_(q, ir.Constant(_V16I8, [15] * 16)), builder.lshr(q, ir.Constant(_V16I8, [4] * 16))
                out.append(_dot(builder, builder.shuffle_vector(lo, hi, index(range(32))), xv))
        return out

    def _pairs(builder, tp, xv) -> list:  # <16 x i32> per two rows (AVX-512): rows 2k, 2k + 1's lanes as in _rows8
        x2 = builder.shuffle_vector(xv, xv, index(list(range(32)) * 2))
        dot = fn(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I32, [_V16I32] * 3)
        out = []
        for k in range(ROWS // 2):
            if qtype == Q.Q8_0:
                q = at(builder, tp, qoff + 2 * k * qbytes, _V64I8)
                absq = builder.call(fn(builder, "llvm.abs.v64i8", _V64I8, [_V64I8, ir.IntType(1)]), [q, _FALSE])
                negative = builder.icmp_signed("<", q, ir.Constant(_V64I8, None))
                signed, unsigned = builder.select(negative, builder.sub(ir.Constant(_V64I8, None), x2), x2), absq
            else:
                q = at(builder, tp, qoff + 2 * k * qbytes, _V32I8)  # rows 2k and 2k + 1: 16 bytes each
                lo, hi = builder.and_(q, ir.Constant(_V32I8, [15] * 32)), builder.lshr(q, ir.Constant(_V32I8, [4] * 32))
                unsigned = builder.shuffle_vector(lo, hi, index(list(range(16)) + list(range(32, 48)) + list(range(16, 32)) + list(range(48, 64))))
                signed = x2
            out.append(builder.call(dot, [ir.Constant(_V16I32, None), builder.bitcast(unsigned, _V16I32),
                                          builder.bitcast(signed, _V16I32)]))
        return out

    def codegen(context, builder, signature, args):
        w, x, dx, sx, nb, out = args
        wp, xp = builder.inttoptr(w, _I8.as_pointer()), builder.inttoptr(x, _I8.as_pointer())
        dxp, sxp = builder.inttoptr(dx, _F32.as_pointer()), builder.inttoptr(sx, _F32.as_pointer())
        fma8 = fn(builder, "llvm.fma.v8f32", _V8F32, [_V8F32] * 3)
        wide = SIMD == "vnni512"  # two rows per instruction: 64 bytes, 16 lanes
        lanes_per_acc = 16 if wide else 8
        vf = ir.VectorType(_F32, lanes_per_acc)
        fma = fn(builder, f"llvm.fma.v{lanes_per_acc}f32", vf, [vf] * 3)
        acc = [cgutils.alloca_once_value(builder, ir.Constant(vf, None)) for _ in range(ROWS * 8 // lanes_per_acc)]
        low = cgutils.alloca_once_value(builder, ir.Constant(_V8F32, None))  # lane r: row r's min/offset terms
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            tp = builder.gep(wp, [builder.mul(b, ir.Constant(b.type, tile))])
            d = builder.fpext(at(builder, tp, 0, V8H), _V8F32)  # the ROWS rows' scales
            scale = builder.fmul(d, _splat(builder, builder.load(builder.gep(dxp, [b])), _V8F32))
            if qtype != Q.Q8_0:
                s = _splat(builder, builder.load(builder.gep(sxp, [b])), _V8F32)
                m = (builder.fmul(d, ir.Constant(_V8F32, [-8.0] * 8)) if qtype == Q.Q4_0
                     else builder.fpext(at(builder, tp, 2 * ROWS, V8H), _V8F32))
                builder.store(builder.call(fma8, [m, s, builder.load(low)]), low)
            xv = builder.load(builder.bitcast(builder.gep(xp, [builder.mul(b, ir.Constant(b.type, BLOCK))]),
                                              _V32I8.as_pointer()), align=1)
            products = _pairs(builder, tp, xv) if wide else _rows8(builder, tp, xv)
            for k, iv in enumerate(products):  # accumulator k: rows k (8 lanes) or 2k, 2k + 1 (16 lanes)
                rows = [k] * 8 if not wide else [2 * k] * 8 + [2 * k + 1] * 8
                sr = builder.shuffle_vector(scale, ir.Constant(_V8F32, None), ir.Constant(ir.VectorType(_I32, len(rows)), rows))
                builder.store(builder.call(fma, [builder.sitofp(iv, vf), sr, builder.load(acc[k])]), acc[k])
        sums = reduce_lanes(builder, [builder.load(a) for a in acc], 8)  # lane r: row r's 8 lanes, a fixed tree
        result = builder.fadd(builder.load(low), sums)
        builder.store(result, builder.bitcast(builder.inttoptr(out, _F32.as_pointer()), _V8F32.as_pointer()), align=4)
        return context.get_dummy_value()

    @intrinsic
    def tile_dot(typingctx, w, x, dx, sx, nb, out):
        return types.none(types.intp, types.intp, types.intp, types.intp, types.intp, types.intp), codegen

    return tile_dot


_t4_0, _t4_1, _t8_0 = (_tile_dot(q) for q in FORMATS)  # compiled only where called (SIMD set)


@njit(fastmath=True, boundscheck=False, cache=True)
def _quantize_rows(x, qx, dx, sx) -> None:  # x [M, I] f32 -> qx int8 [M, I], dx/sx [M, I/32]
    for m in range(x.shape[0]):
        for b in range(x.shape[1] // BLOCK):
            amax = np.float32(0)
            for j in range(BLOCK):
                amax = max(amax, abs(x[m, b * BLOCK + j]))
            d = amax / np.float32(127)
            inv = np.float32(1) / d if d > 0 else np.float32(0)
            total = 0
            for j in range(BLOCK):
                q = np.int32(np.rint(x[m, b * BLOCK + j] * inv))
                qx[m, b * BLOCK + j] = q
                total += q
            dx[m, b], sx[m, b] = d, d * np.float32(total)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [M, I] float32 -> (qx int8 [M, I], dx float32 [M, I/32] scales, sx float32 [M, I/32] = dx * sum(qx))."""
    M, I = x.shape
    qx, dx, sx = np.empty((M, I), np.int8), np.empty((M, I // BLOCK), np.float32), np.empty((M, I // BLOCK), np.float32)
    _quantize_rows(x, qx, dx, sx)
    return qx, dx, sx


@njit(parallel=True, boundscheck=False, fastmath=False, cache=True)
def _rows(kind, tiles, qx, dx, sx, out) -> None:  # out[m, o] = row o of the weight (FORMATS[kind]) . activation row m
    G, M, nb, O = tiles.shape[0], qx.shape[0], dx.shape[1], out.shape[1]
    wa, xa, da, sa, oa = tiles.ctypes.data, qx.ctypes.data, dx.ctypes.data, sx.ctypes.data, out.ctypes.data
    rb, xb = tiles.shape[1], qx.shape[1]
    for g in prange(G):
        for m in range(M):
            args = (wa + g * rb, xa + m * xb, da + m * nb * 4, sa + m * nb * 4, nb, oa + (m * O + g * ROWS) * 4)
            if kind == 0:
                _t4_0(*args)
            elif kind == 1:
                _t4_1(*args)
            else:
                _t8_0(*args)


@njit(cache=True, fastmath=False)
def _matmul(kind, tiles, x):  # x [M, I] float32 (C order) -> [M, O]: quantize_rows, then _rows
    M, I = x.shape
    qx, dx, sx = np.empty((M, I), np.int8), np.empty((M, I // BLOCK), np.float32), np.empty((M, I // BLOCK), np.float32)
    _quantize_rows(x, qx, dx, sx)
    out = np.empty((M, tiles.shape[0] * ROWS), np.float32)
    if M:
        _rows(kind, tiles, qx, dx, sx, out)
    return out


def matmul(qtype: gguf.GGMLQuantizationType, tiles: np.ndarray, x: np.ndarray) -> np.ndarray:
    """tiles: ``repack``ed weight of ``qtype`` [O / ROWS, ...]; x: [M, I] float32 -> [M, O] float32."""
    return _matmul(FORMATS.index(qtype), tiles, np.ascontiguousarray(x, np.float32))
