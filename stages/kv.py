"""Per-request KV cache of one stage and the row layout of a batched forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class SeqCache:
    """Keys and values of one request for this stage's layers: [layers, KV, capacity, hd] each."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self._shape = (layers, kv_heads, 0, head_dim)
        self.dtype, self.device = dtype, device
        self.k = torch.empty(self._shape, dtype=dtype, device=device)
        self.v = torch.empty(self._shape, dtype=dtype, device=device)
        self.length = 0  # rows committed (all layers written)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write rows ``pos..pos+n`` (k, v: [n, KV, hd]); return this layer's keys/values [KV, pos+n, hd]."""
        end = pos + k.shape[0]
        self._reserve(end)
        self.k[layer, :, pos:end] = k.transpose(0, 1)
        self.v[layer, :, pos:end] = v.transpose(0, 1)
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def _reserve(self, rows: int) -> None:
        capacity = self.k.shape[2]
        if rows <= capacity:
            return
        new = max(rows, 2 * capacity, 64)
        for name in ("k", "v"):
            old = getattr(self, name)
            grown = torch.empty((*self._shape[:2], new, self._shape[3]), dtype=self.dtype, device=self.device)
            grown[:, :, :capacity] = old
            setattr(self, name, grown)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


@dataclass
class Segment:
    cache: SeqCache
    pos: int  # position of the first row
    rows: slice  # rows of the batch tensor that belong to this request


@dataclass
class Rows:
    segments: list[Segment]
    positions: torch.Tensor  # [T] long
    sample_rows: torch.Tensor  # [S] long: last row of every segment that samples

    @classmethod
    def build(cls, parts: list[tuple[SeqCache, int, int, bool]], device: torch.device) -> "Rows":
        """parts: (cache, pos, n, sample) per request, in row order."""
        segments, positions, sample, offset = [], [], [], 0
        for cache, pos, n, wants_sample in parts:
            segments.append(Segment(cache, pos, slice(offset, offset + n)))
            positions.append(torch.arange(pos, pos + n))
            if wants_sample:
                sample.append(offset + n - 1)
            offset += n
        return cls(
            segments,
            torch.cat(positions).to(device),
            torch.tensor(sample, dtype=torch.long, device=device),
        )
