"""Micro-benchmark of the projection kernels (stages/quant.py, stages/kernels.py): every candidate the
tuning chooses from (``numba`` tile kernel, ``numba-gemv``, ``torch-tile``, torch's own F.linear for bf16),
for bf16 weights and each GGUF type.

    python -m bench.quant_kernels                                  # every type, shape and row count
    python -m bench.quant_kernels --types Q4_0,Q8_0 --rows 1,16 --shapes 2048x8192 --kernels numba,numba-gemv

For each weight shape O x I (out x in features), format, kernel and row count M: ms per call (the fastest)
and GB/s of the weight bytes as stored (bytes / time); "-" where the kernel is not a candidate at M rows
(decode kernels up to MAX_ROWS rows, prompt kernels above). Inputs hold bf16 values (float32 arrays, as
the fused path passes them). Weights are random valid blocks; each measurement cycles through enough
copies of the matrix to exceed --working-set-mib, so the weights come from memory, not from the
last-level cache, as they would in a model's forward pass.
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

from parallax.stages.kernels import Matrix
from parallax.stages.quant import TYPES, QuantMatrix
from parallax.stages.tuning import MAX_ROWS

Q = gguf.GGMLQuantizationType
SHAPES = ((576, 576), (1536, 576), (576, 1536), (49152, 576), (2048, 2048), (8192, 2048), (2048, 8192))
ROWS = (1, 4, 16, 64, 256)
KERNELS = ("numba", "numba-gemv", "torch-tile", "torch")
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
    p.add_argument("--kernels", default=",".join(KERNELS))
    p.add_argument("--min-seconds", type=float, default=0.3, help="time spent per measurement")
    p.add_argument("--working-set-mib", type=int, default=64, help="cycle copies of a weight up to this size")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (numba follows)")
    args = p.parse_args(argv)
    types = [Q[name.strip().upper()] for name in args.types.split(",") if name.strip()]
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    rows = [int(n) for n in args.rows.split(",")]
    names = [n.strip() for n in args.kernels.split(",")]
    rng = np.random.default_rng(0)
    warm = QuantMatrix(Q.Q8_0, (1, 32), np.zeros((1, 34), np.uint8))
    warm.matmul(torch.zeros(1, 32))  # start numba's thread pool first: its start resets torch's thread count
    torch.set_num_threads(args.threads)
    warm.matmul(torch.zeros(1, 32))  # numba follows torch
    print(machine())
    print("GB/s = weight bytes as stored / time per call. Shared, noisy machine.")
    print(f"{'shape OxI':>11} {'type':>5} {'kernel':>10} {'MiB':>7} " + " ".join(f"{'M=' + str(m):>17}" for m in rows))
    for O, I in shapes:
        xs = {m: torch.randn(m, I).to(torch.bfloat16).float().numpy() for m in rows}
        for fmt in ["bf16"] + types:
            if fmt != "bf16" and I % gguf.GGML_QUANT_SIZES[fmt][0]:
                print(f"{O:>5}x{I:<5} {fmt.name:>5}   n/a: {I} is not a multiple of {gguf.GGML_QUANT_SIZES[fmt][0]}")
                continue
            one = _matrix(fmt, O, I, rng)
            mats = [one] + [_matrix(fmt, O, I, rng) for _ in range(copies(one.nbytes, args.working_set_mib) - 1)]
            for name in names:
                cells = []
                for m in rows:
                    kind = "decode" if m <= MAX_ROWS else "prefill"
                    if name not in one.candidates(kind, torch.bfloat16):
                        cells.append(f"{'-':>17}")
                        continue
                    seconds = timed(lambda x, mat: mat.run(name, x), [(xs[m], mat) for mat in mats], args.min_seconds)
                    cells.append(_cell(seconds, one.nbytes))
                label = fmt if fmt == "bf16" else fmt.name
                print(f"{O:>5}x{I:<5} {label:>5} {name:>10} {one.nbytes / 2**20:7.2f} " + " ".join(cells), flush=True)
            del mats


def _matrix(fmt, O: int, I: int, rng: np.random.Generator) -> Matrix | QuantMatrix:
    if fmt == "bf16":
        return Matrix(torch.from_numpy(rng.standard_normal((O, I), np.float32)).to(torch.bfloat16), None)
    return QuantMatrix(fmt, (O, I), random_blocks(fmt, O, I, rng))


def _cell(seconds: float, nbytes: int) -> str:
    return f"{seconds * 1e3:8.3f}ms {nbytes / seconds / 1e9:5.1f}GB/s"


if __name__ == "__main__":
    main()
