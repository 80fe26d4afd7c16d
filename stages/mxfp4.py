"""MXFP4 weights as stored (gpt-oss's experts), dequantized a tile at a time in the product, never all at once.

A :class:`MXFP4Matrix` holds a weight [O, I] in the layout of Hugging Face's MXFP4 checkpoints (``*_blocks``,
``*_scales``, ``quantization_config.quant_method: mxfp4``): ``blocks`` uint8 [O, I / 32, 16], two FP4 (E2M1)
values a byte, element 2j of a block in the low nibble of byte j and element 2j + 1 in the high nibble;
``scales`` uint8 [O, I / 32], one E8M0 exponent a block (w = fp4 * 2^(scale - 127)): 17 bytes per 32
weights. This is transformers' ``convert_moe_packed_tensors`` order (ggml's MXFP4 blocks differ: scale byte
first, element j in the low nibble of byte j and j + 16 in its high nibble; ``from_ggml`` converts).

The product (``matmul``, torch: CPU or CUDA) decodes ``TILE_BYTES`` of weight rows at a time into one scratch
tile in the activation dtype (every MXFP4 value is exact in float32, bfloat16 and float16 alike: two
significant bits times a power of two) and multiplies it with ``F.linear``; the bias is added at the end.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

BLOCK = 32  # weights per block (one scale)
BLOCK_BYTES = 16  # packed FP4 bytes per block
TILE_BYTES = 4 << 20  # decoded rows per tile (bytes of the activation dtype)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # E2M1 codes
SCALE_BIAS = 127  # E8M0: 2^(byte - 127); 255 is NaN


class MXFP4Matrix:
    """y = x W^T (+ b) with W [O, I] as MXFP4 ``blocks`` [O, I/32, 16] and ``scales`` [O, I/32] (uint8, used as
    given) and an optional ``bias`` [O] (a float tensor, added in the activation dtype). A ``kernels.Projection``."""

    fmt = "MXFP4"

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
            raise ValueError(f"MXFP4 blocks and scales are uint8; got {blocks.dtype}, {scales.dtype}")
        if blocks.dim() != 3 or blocks.shape[2] != BLOCK_BYTES or tuple(scales.shape) != tuple(blocks.shape[:2]):
            raise ValueError(f"MXFP4 blocks are [O, I/32, 16] with scales [O, I/32]; got {list(blocks.shape)} and "
                             f"{list(scales.shape)}")
        if min(blocks.shape[:2]) < 1:
            raise ValueError(f"an MXFP4 weight needs at least one row and one block; got {list(blocks.shape)}")
        if scales.device != blocks.device:
            raise ValueError(f"blocks on {blocks.device} and scales on {scales.device}")
        self.blocks, self.scales = blocks.contiguous(), scales.contiguous()
        self.shape = (int(blocks.shape[0]), int(blocks.shape[1]) * BLOCK)
        if bias is not None and tuple(bias.shape) != (self.shape[0],):
            raise ValueError(f"bias must have shape ({self.shape[0]},); got {list(bias.shape)}")
        self.bias = None if bias is None else bias.detach().to(blocks.device)
        self._lut: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def from_ggml(cls, data: np.ndarray, shape: tuple[int, int], bias: torch.Tensor | None = None) -> "MXFP4Matrix":
        """ggml's MXFP4 blocks (``gguf.quants.quantize(w, MXFP4)``: uint8 [O, I/32 * 17]) in this layout."""
        O, I = shape
        raw = np.asarray(data, np.uint8).reshape(O, I // BLOCK, 1 + BLOCK_BYTES)
        scales, qs = raw[..., 0], raw[..., 1:]  # [O, G], [O, G, 16]: element j low nibble, j + 16 high
        values = np.concatenate([qs & 15, qs >> 4], axis=-1)  # [O, G, 32] codes in element order
        blocks = values[..., 0::2] | (values[..., 1::2] << 4)  # element 2j low, 2j + 1 high
        return cls(torch.from_numpy(np.ascontiguousarray(blocks)), torch.from_numpy(np.ascontiguousarray(scales)), bias)

    def with_bias(self, bias: torch.Tensor | None) -> "MXFP4Matrix":
        """The same blocks (not copied) with ``bias``."""
        return MXFP4Matrix(self.blocks, self.scales, bias)

    def to(self, device: torch.device) -> "MXFP4Matrix":
        if self.blocks.device == torch.device(device):
            return self
        bias = None if self.bias is None else self.bias.to(device)
        return MXFP4Matrix(self.blocks.to(device), self.scales.to(device), bias)

    @property
    def nbytes(self) -> int:
        """Bytes held: blocks, scales (17 per 32 weights) and bias."""
        return self.blocks.nbytes + self.scales.nbytes + (0 if self.bias is None else self.bias.nbytes)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows start..stop-1 of W [stop - start, I] in ``dtype`` (exact: fp4 value times a power of two)."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"rows {start}:{stop} are outside 0:{self.shape[0]}")
        out = torch.empty(stop - start, self.shape[1], dtype=dtype, device=self.blocks.device)
        self._decode_into(start, stop, out)
        return out

    def _decode_into(self, start: int, stop: int, out: torch.Tensor) -> None:
        """Decodes rows start..stop-1 into ``out`` [stop - start, I] (its dtype)."""
        lut = self._lut.get(out.dtype)
        if lut is None:
            lut = self._lut[out.dtype] = torch.tensor(FP4_VALUES, dtype=out.dtype, device=self.blocks.device)
        n, groups = stop - start, self.shape[1] // BLOCK
        blk = self.blocks[start:stop]  # [n, G, 16]
        view = out.view(n, groups, BLOCK)  # [n, G, 32]
        view[..., 0::2] = lut[(blk & 15).long()]
        view[..., 1::2] = lut[(blk >> 4).long()]
        exps = self.scales[start:stop].to(torch.int32) - SCALE_BIAS  # [n, G]
        view.mul_(torch.exp2(exps.to(torch.float32)).to(out.dtype)[..., None])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, I] float -> [M, O] in x's dtype, one tile of decoded weight rows at a time."""
        O, I = self.shape
        if x.dim() != 2 or x.shape[1] != I:
            raise ValueError(f"input must be [rows, {I}]; got {list(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"input must be floating point; got {x.dtype}")
        tile = max(1, min(O, TILE_BYTES // (I * x.element_size())))
        scratch = torch.empty(tile, I, dtype=x.dtype, device=x.device)  # [tile, I], reused for every tile
        out = torch.empty(x.shape[0], O, dtype=x.dtype, device=x.device)
        for start in range(0, O, tile):
            n = min(tile, O - start)
            self._decode_into(start, start + n, scratch[:n])
            out[:, start : start + n] = F.linear(x, scratch[:n])
        return out if self.bias is None else out.add_(self.bias.to(x.dtype))

    def decode(self, x: np.ndarray) -> np.ndarray:  # the Projection protocol's numpy entries: float32 rows
        return self.matmul(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()

    def prefill(self, x: np.ndarray) -> np.ndarray:
        return self.decode(x)
