"""Paged KV storage of one stage and the row layout of one batched forward (PyTorch).

Keys and values live in a pool of fixed-size blocks: ``[layers, num_blocks * block_size, KV, hd]``
("slots"). A request's block table maps its positions to slots; the engine's BlockManager decides
which blocks a request owns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVPool:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, num_blocks * block_size, kv_heads, head_dim)
        # zeros, not empty: padded reads in batched decode must never see NaN/inf garbage
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size, self.device = block_size, device

    @staticmethod
    def bytes_per_block(layers: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        return 2 * layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, k)  # slots: [T]; k, v: [T, KV, hd]
        self.v[layer].index_copy_(0, slots, v)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots: [..., L] -> keys, values [..., L, KV, hd]."""
        return self.k[layer][slots], self.v[layer][slots]


def slots_for(table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return table[positions // block_size] * block_size + positions % block_size


@dataclass
class Prefill:
    """Several rows of one request at positions pos..pos+n-1 (attention is causal among them)."""

    rows: slice
    pos: int
    read_slots: torch.Tensor | None  # [pos + n] when earlier rows are cached, None when pos == 0


@dataclass
class Decode:
    """One row for each of B requests, attention batched over padded key slots."""

    rows: torch.Tensor  # [B] row indices
    read_slots: torch.Tensor  # [B, Lmax]
    mask: torch.Tensor | None  # [B, 1, 1, Lmax] bool, True where a key is visible; None: no padding


@dataclass
class Rows:
    positions: torch.Tensor  # [T] long
    write_slots: torch.Tensor  # [T] long
    prefills: list[Prefill]
    decode: Decode | None
    sample_rows: torch.Tensor  # [S] long: the last row of every item that samples

    @classmethod
    def build(cls, parts: list[tuple[list[int], int, int, bool]], block_size: int, device: torch.device) -> "Rows":
        """parts: (block table, pos, n, sample) per item, in row order."""
        positions, writes, prefills, dec, sample, offset = [], [], [], [], [], 0
        for table, pos, n, wants_sample in parts:
            t = torch.tensor(table, dtype=torch.long)
            pos_range = torch.arange(pos, pos + n)
            positions.append(pos_range)
            writes.append(slots_for(t, pos_range, block_size))
            if n == 1:
                dec.append((offset, slots_for(t, torch.arange(pos + 1), block_size)))
            else:
                read = slots_for(t, torch.arange(pos + n), block_size).to(device) if pos else None
                prefills.append(Prefill(slice(offset, offset + n), pos, read))
            if wants_sample:
                sample.append(offset + n - 1)
            offset += n
        return cls(
            torch.cat(positions).to(device), torch.cat(writes).to(device), prefills,
            _decode(dec, device) if dec else None, torch.tensor(sample, dtype=torch.long, device=device),
        )


def _decode(items: list[tuple[int, torch.Tensor]], device: torch.device) -> Decode:
    longest = max(len(s) for _, s in items)
    slots = torch.zeros(len(items), longest, dtype=torch.long)  # padding reads slot 0, masked out
    mask = torch.zeros(len(items), 1, 1, longest, dtype=torch.bool)
    for i, (_, s) in enumerate(items):
        slots[i, : len(s)] = s
        mask[i, ..., : len(s)] = True
    rows = torch.tensor([r for r, _ in items], dtype=torch.long)
    padded = any(len(s) != longest for _, s in items)  # a mask sends SDPA down a much slower path
    return Decode(rows.to(device), slots.to(device), mask.to(device) if padded else None)
