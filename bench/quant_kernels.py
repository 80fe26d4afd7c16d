"""Micro-benchmark of the GGUF-quantized matmul kernels (stages/quant.py) next to torch's bf16 F.linear.

    python -m bench.quant_kernels                                  # every type, shape and row count
    python -m bench.quant_kernels --types Q4_0,Q8_0 --rows 1,16 --shapes 2048x8192

For each weight shape O x I (out x in features) and row count M: ms per call (the fastest) and GB/s of the
weight bytes as stored (bytes / time); for bf16 F.linear the bf16 bytes. Weights are random valid
blocks; each measurement cycles through enough copies of the matrix to exceed --working-set-mib, so the
weights come from memory, not from the last-level cache, as they would in a model's forward pass.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import gguf
import numba
import numpy as np
import torch
import torch.nn.functional as F

from parallax.stages.quant import TYPES, QuantMatrix

Q = gguf.GGMLQuantizationType
SHAPES = ((576, 576), (1536, 576), (576, 1536), (49152, 576), (2048, 2048), (8192, 2048), (2048, 8192))
ROWS = (1, 4, 16, 64, 512)
F16_OFFSETS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2),
               Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # where each block keeps its f16 scales (d, and m/dmin)


def random_blocks(qtype: gguf.GGMLQuantizationType, out_features: int, in_features: int,
                  rng: np.random.Generator) -> np.ndarray:
    """A valid [O, bytes per row] block array: random quants and sub-block scales, f16 scales in 1e-3..1e-2."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = in_features // block
    b = rng.integers(0, 256, (out_features, n, size), dtype=np.uint8)
    for off in F16_OFFSETS[qtype]:
        scales = rng.uniform(1e-3, 1e-2, (out_features, n)).astype(np.float16)
        b[:, :, off:off + 2] = scales.view(np.uint8).reshape(out_features, n, 2)
    return b.reshape(out_features, n * size)


def timed(fn, calls: list, min_s: float) -> float:
    """Seconds of the fastest call, cycling through ``calls`` (argument tuples) for at least min_s and 3 calls.
    The fastest, not the median: on a machine shared with other jobs it is the least disturbed call."""
    fn(*calls[0])  # warm up (compile / first-touch)
    times, start, i = [], time.perf_counter(), 0
    while len(times) < 3 or time.perf_counter() - start < min_s:
        t = time.perf_counter()
        fn(*calls[i % len(calls)])
        times.append(time.perf_counter() - t)
        i += 1
    return min(times)


def copies(nbytes: int, working_set_mib: int) -> int:
    return max(1, -(-working_set_mib * 2**20 // nbytes))


def machine() -> str:
    flags = sorted(set(re.findall(r"avx512[a-z_0-9]*|avx2", Path("/proc/cpuinfo").read_text())))
    return (f"cpu flags: {' '.join(flags) or 'none of avx2/avx512'}\n"
            f"threads: torch {torch.get_num_threads()}, numba {numba.get_num_threads()} "
            f"(layer {numba.threading_layer()})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", default=",".join(t.name for t in TYPES))
    p.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="OxI,... (out x in)")
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    p.add_argument("--min-seconds", type=float, default=0.3, help="time spent per measurement")
    p.add_argument("--working-set-mib", type=int, default=64, help="cycle copies of a weight up to this size")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (numba follows)")
    args = p.parse_args(argv)
    types = [Q[name.strip().upper()] for name in args.types.split(",")]
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    rows = [int(n) for n in args.rows.split(",")]
    rng = np.random.default_rng(0)
    warm = QuantMatrix(Q.Q8_0, (1, 32), np.zeros((1, 34), np.uint8))
    warm.matmul(torch.zeros(1, 32))  # start numba's thread pool first: its start resets torch's thread count
    torch.set_num_threads(args.threads)
    warm.matmul(torch.zeros(1, 32))  # numba follows torch
    print(machine())
    print("GB/s = weight bytes as stored / time per call; bf16 = torch F.linear on the bf16 weight. Shared, noisy machine.")
    print(f"{'shape OxI':>11} {'type':>5} {'MiB':>7} " + " ".join(f"{'M=' + str(m):>17}" for m in rows))
    for O, I in shapes:
        xs = {m: torch.randn(m, I).to(torch.bfloat16) for m in rows}
        w = [torch.randn(O, I).to(torch.bfloat16) for _ in range(copies(O * I * 2, args.working_set_mib))]
        cells = [_cell(timed(lambda x, wi: F.linear(x, wi), [(xs[m], wi) for wi in w], args.min_seconds), O * I * 2)
                 for m in rows]
        print(f"{O:>5}x{I:<5} {'bf16':>5} {O * I * 2 / 2**20:7.2f} " + " ".join(cells), flush=True)
        del w
        for qtype in types:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            if I % block:
                print(f"{O:>5}x{I:<5} {qtype.name:>5}   n/a: {I} is not a multiple of {block}", flush=True)
                continue
            nbytes = O * I // block * size
            mats = [QuantMatrix(qtype, (O, I), random_blocks(qtype, O, I, rng))
                    for _ in range(copies(nbytes, args.working_set_mib))]
            cells = [_cell(timed(lambda x, mat: mat.matmul(x), [(xs[m], mat) for mat in mats], args.min_seconds),
                           nbytes) for m in rows]
            print(f"{O:>5}x{I:<5} {qtype.name:>5} {nbytes / 2**20:7.2f} " + " ".join(cells), flush=True)


def _cell(seconds: float, nbytes: int) -> str:
    return f"{seconds * 1e3:8.3f}ms {nbytes / seconds / 1e9:5.1f}GB/s"


if __name__ == "__main__":
    main()
