"""LLVM IR helpers shared by the SIMD kernels written with llvmlite inside numba intrinsics (``stages.int8dot``,
``stages.bf16dot``)."""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils

I32 = ir.IntType(32)


def index(values) -> ir.Constant:
    """A shufflevector mask."""
    values = list(values)
    return ir.Constant(ir.VectorType(I32, len(values)), values)


def fn(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    """The declaration of an LLVM intrinsic (or any function) in the builder's module."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def reduce_lanes(builder: ir.IRBuilder, vectors: list, width: int) -> ir.Value:
    """Float vectors holding segments of ``width`` lanes (one sum each, in order) -> <n x float>, lane i = segment
    i's lanes summed by a fixed halving tree (lane k plus lane k + width/2, then k + width/4, ...): the same adds
    whatever n is and however the segments are spread over vectors; all of them at once, so a step is one add."""
    parts = list(vectors)
    while width > 1:
        half, merged = width // 2, []
        for k in range(0, len(parts), 2):
            a, b = parts[k], parts[k + 1] if k + 1 < len(parts) else None
            lo = [s * width + j for s in range(a.type.count // width) for j in range(half)]
            if b is not None:
                lo += [a.type.count + s * width + j for s in range(b.type.count // width) for j in range(half)]
            b = a if b is None else b
            merged.append(builder.fadd(builder.shuffle_vector(a, b, index(lo)),
                                       builder.shuffle_vector(a, b, index(i + half for i in lo))))
        parts, width = merged, half
    assert len(parts) == 1, "the vectors must hold 2^k segments"
    return parts[0]
