"""4-bit GGUF blocks (Q4_0, Q4_1, Q4_K) held in torch's own int4 layout and multiplied by torch's int4
weight-only kernel (``aten._weight_int4pack_mm_for_cpu``, "tinygemm": 4-bit weights unpacked in
registers, bf16 activations, AVX2/AVX-512 code in torch itself).

Both formats are 32 weights sharing a scale (Q4_1 also a minimum), which is exactly the kernel's
group of 32: ``w = (q - 8) * scale + zero`` with ``scale = d`` and ``zero = 0`` (Q4_0: ``d * (q - 8)``)
or ``zero = m + 8 d`` (Q4_1: ``d * q + m``); a Q4_K block is 8 groups of 32 with 6-bit scales and mins
(``d * sc * q - dmin * m``): ``scale = d * sc``, ``zero = 8 d sc - dmin m``. The nibbles move into torch's layout as they are; the
kernel keeps scale and zero in bf16, so the f16 ``d``/``m`` of the blocks are rounded to bf16 (3 fewer
bits of a scale; the products are rounded to bf16 anyway in a bf16 run). That is why this kernel is
only offered for bf16 activations: a float32 stage keeps the blocks and the exact kernels.

The repacked weight is held instead of the blocks, never beside them: 16 bytes of nibbles + 4 bytes of
bf16 scale and zero per 32 weights (Q4_1's 20 bytes; Q4_0's and Q4_K's 18 become 20). Measured on a 2-core AMD
EPYC (avx2 avx512f/bw/vl avx512_bf16 avx512_vnni), 2 threads, ms per call: 1536x576 at 1 row 0.029
(numba GEMV over the blocks 0.100), 16 rows 0.175 (numba tile 0.241), 64 rows 0.72 (0.74);
49152x576 at 1 row 0.78 (2.9).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

from . import hugepages

Q = gguf.GGMLQuantizationType
FORMATS = (Q.Q4_0, Q.Q4_1, Q.Q4_K)
GROUP = 32  # weights per scale: a GGUF block
ROW_BLOCK = 64  # output rows torch's CPU layout interleaves: rows r and r + 32 of a block share a byte
KERNEL = "int4pack"


def eligible(qtype: Q, shape: tuple[int, int], dtype: torch.dtype) -> bool:
    """Whether a weight of this type and shape [O, I] can run the int4 kernel for activations of ``dtype``."""
    O, I = shape
    return qtype in FORMATS and dtype == torch.bfloat16 and O % ROW_BLOCK == 0 and I % GROUP == 0


def most_bytes(qtype: Q, shape: tuple[int, int], dtype: torch.dtype, stored: int) -> int:
    """The most a weight of ``stored`` bytes may take once loaded: its int4 repack where it can have one
    (whether it does is measured at load)."""
    O, I = shape
    return max(stored, O * I // 2 + O * I // GROUP * 4) if eligible(qtype, shape, dtype) else stored


@dataclass(frozen=True, eq=False)
class Int4Pack:
    """A weight [O, I] in torch's int4 layout: ``packed`` uint8 [O, I / 2] and ``scales_zeros`` bf16
    [I / 32, O, 2] (w = (q - 8) * scale + zero)."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes

    @classmethod
    def from_blocks(cls, qtype: Q, blocks: np.ndarray, rows_per_chunk: int = 4096) -> Int4Pack:
        """blocks: uint8 [O, I / 32 * block bytes] of ``qtype``, repacked a chunk of rows at a time (the
        unpacked nibbles of a chunk are the only temporary)."""
        O = blocks.shape[0]
        weights, size = gguf.GGML_QUANT_SIZES[qtype]
        I = blocks.shape[1] // size * weights
        if not eligible(qtype, (O, I), torch.bfloat16):
            raise ValueError(f"{qtype.name} {O}x{I} cannot be held as int4 (Q4_0/Q4_1/Q4_K, rows a multiple of {ROW_BLOCK})")
        packed = torch.empty(O, I // 2, dtype=torch.uint8)
        scales_zeros = torch.empty(I // GROUP, O, 2, dtype=torch.bfloat16)
        step = max(ROW_BLOCK, rows_per_chunk // ROW_BLOCK * ROW_BLOCK)
        for r in range(0, O, step):
            q, scale, zero = _split(qtype, blocks[r:r + step])  # q: [n, I] int32; scale, zero: [n, I/32] float32
            packed[r:r + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q), 1)
            scales_zeros[:, r:r + step, 0] = torch.from_numpy(scale.T)
            scales_zeros[:, r:r + step, 1] = torch.from_numpy(zero.T)
        return cls(packed, scales_zeros)

    def held(self) -> Int4Pack:
        """A copy on memory for the stage's lifetime (``hugepages.held``)."""
        return Int4Pack(torch.from_numpy(hugepages.held(self.packed.numpy())),
                        torch.from_numpy(hugepages.held(self.scales_zeros.view(torch.uint16).numpy())).view(torch.bfloat16))

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, I] bf16 -> [M, O] bf16."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of the weight as float32 [len(ids), I]: (q - 8) * scale + zero, as the kernel reads it."""
        O, I = self.shape
        flat = self.packed.view(-1).numpy().reshape(O // ROW_BLOCK, I, ROW_BLOCK // 2)  # [row block, k, byte]
        ids = np.asarray(ids, np.int64)
        nibbles = flat[ids // ROW_BLOCK, :, ids % (ROW_BLOCK // 2)]  # [n, I]
        low = (ids % ROW_BLOCK < ROW_BLOCK // 2)[:, None]  # rows r < 32 of a block: low nibbles
        q = np.where(low, nibbles & 15, nibbles >> 4).astype(np.float32)
        sz = self.scales_zeros[:, torch.from_numpy(ids)].float().numpy()  # [I/32, n, 2]
        scale = np.repeat(sz[:, :, 0].T, GROUP, axis=1)  # [n, I]
        zero = np.repeat(sz[:, :, 1].T, GROUP, axis=1)
        return ((q - 8) * scale + zero).astype(np.float32)


def _split(qtype: Q, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF rows of blocks -> nibbles q [n, I] int32 (0..15), scale and zero [n, I/32] float32."""
    n = blocks.shape[0]
    b = blocks.reshape(n, -1, gguf.GGML_QUANT_SIZES[qtype][1])  # [n, blocks, bytes]
    if qtype == Q.Q4_K:
        return _split_q4_k(b)
    head = 4 if qtype == Q.Q4_1 else 2
    d = _f16(b[:, :, 0:2])  # [n, groups]
    qs = b[:, :, head:head + 16]  # element j: low nibble of byte j, element j + 16: its high nibble
    q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(n, -1).astype(np.int32)
    if qtype == Q.Q4_1:
        return q, d, _f16(b[:, :, 2:4]) + 8 * d
    return q, d, np.zeros_like(d)


def _split_q4_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K: d, dmin f16, 12 bytes of 6-bit scales and mins (8 groups), 128 bytes: group 2c + h, element l is
    nibble h of byte 32c + l."""
    n, nb = b.shape[:2]
    d, dmin, sm = _f16(b[:, :, 0:2]), _f16(b[:, :, 2:4]), b[:, :, 4:16].astype(np.int32)  # sm: [n, nb, 12]
    sc = np.concatenate([sm[..., 0:4] & 63, (sm[..., 8:12] & 15) | ((sm[..., 0:4] >> 6) << 4)], axis=2)  # [n, nb, 8]
    mn = np.concatenate([sm[..., 4:8] & 63, (sm[..., 8:12] >> 4) | ((sm[..., 4:8] >> 6) << 4)], axis=2)
    qs = b[:, :, 16:144].reshape(n, nb, 4, 1, 32)  # [n, nb, c, 1, l]
    q = np.concatenate([qs & 15, qs >> 4], axis=3).reshape(n, -1).astype(np.int32)  # [n, nb * 256]
    scale = (d[:, :, None] * sc).astype(np.float32)  # [n, nb, 8]
    zero = 8 * scale - (dmin[:, :, None] * mn).astype(np.float32)
    return q, scale.reshape(n, -1), zero.reshape(n, -1)


def _f16(two_bytes: np.ndarray) -> np.ndarray:  # [..., 2] little-endian IEEE half -> float32 [...]
    return np.ascontiguousarray(two_bytes).view(np.float16)[..., 0].astype(np.float32)
