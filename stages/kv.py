"""Paged KV storage of one stage and the row layout of one batched forward (PyTorch).

Keys and values live in a pool of fixed-size blocks: ``[layers, num_blocks * block_size, KV, hd]``
("slots"). A request's block table maps its positions to slots; the engine's BlockManager decides
which blocks a request owns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Protocol

import numpy as np
import torch


class KVCache(Protocol):
    """What attention reads and writes: each layer's keys and values by slot (``block * block_size +
    offset``), the layer's KV group (``Rows.group``) and, for numba kernels, each layer's arrays."""

    block_size: int
    group_of: Sequence[int]  # [layer] -> its KV group

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def read_blocks(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def bits(self) -> tuple[Sequence[np.ndarray], Sequence[np.ndarray]]: ...


class KVPool:
    """One pool of blocks for every layer (one KV group). ``v_head_dim`` (default ``head_dim``) may differ from
    the keys' width; 0 for a model whose cache holds one tensor per position (DeepSeek's MLA latent, in ``k``)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, v_head_dim: int | None = None):
        shape = (layers, num_blocks * block_size, kv_heads, head_dim)
        # zeros, not empty: padded reads in batched decode must never see NaN/inf garbage
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape[:3] + (head_dim if v_head_dim is None else v_head_dim,), dtype=dtype, device=device)
        self.block_size, self.device = block_size, device
        self.group_of = [0] * layers
        self._bits: tuple[np.ndarray, np.ndarray] | None = None

    def bits(self) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values as numpy arrays sharing the pool's memory, for numba kernels: the bits of a bf16
        pool (uint16), a float32 pool as is."""
        if self._bits is None:
            as_numpy = (lambda t: t.numpy()) if self.k.dtype == torch.float32 else (
                lambda t: t.view(torch.int16).numpy().view(np.uint16))
            self._bits = (as_numpy(self.k), as_numpy(self.v))
        return self._bits

    @staticmethod
    def bytes_per_block(layers: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                        v_head_dim: int | None = None) -> int:
        widths = head_dim + (head_dim if v_head_dim is None else v_head_dim)
        return layers * block_size * kv_heads * widths * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, k)  # slots: [T]; k, v: [T, KV, hd]
        self.v[layer].index_copy_(0, slots, v)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots: [L] -> keys, values [L, KV, hd]."""
        return self.k[layer].index_select(0, slots), self.v[layer].index_select(0, slots)

    def read_blocks(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tables: [B, nb] block ids -> keys, values [B, nb * block_size, KV, hd]. Whole blocks are
        copied (index_select over blocks is ~4x faster than gathering single slots)."""
        B, n = tables.shape
        blocks = self.k.shape[1] // self.block_size
        k = self.k[layer].view(blocks, self.block_size, *self.k.shape[2:])  # [blocks, bs, KV, hd]
        v = self.v[layer].view(blocks, self.block_size, *self.v.shape[2:])
        flat = tables.reshape(-1)
        return (k.index_select(0, flat).view(B, n * self.block_size, *k.shape[2:]),
                v.index_select(0, flat).view(B, n * self.block_size, *v.shape[2:]))


class GroupedKV:
    """A stage's KV cache as one ``KVPool`` per KV group (``blocks.kv_groups``): a layer's keys live in its
    group's pool, addressed by that group's block tables."""

    def __init__(self, groups: Sequence[Sequence[int]], sizes: Sequence[int], kv_heads: int, head_dim: int,
                 block_size: int, dtype: torch.dtype, device: torch.device, v_head_dim: int | None = None):
        """groups: each group's layers; sizes: each group's blocks."""
        self.pools = [KVPool(len(layers), kv_heads, head_dim, n, block_size, dtype, device, v_head_dim)
                      for layers, n in zip(groups, sizes)]
        where = {layer: (g, j) for g, layers in enumerate(groups) for j, layer in enumerate(layers)}
        if sorted(where) != list(range(len(where))):
            raise ValueError(f"KV groups {groups} do not hold every layer once")
        self.group_of = [where[i][0] for i in range(len(where))]
        self._slot = [where[i][1] for i in range(len(where))]  # [layer] -> its index in its group's pool
        self.block_size, self.device = block_size, device

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.pools[self.group_of[layer]].write(self._slot[layer], slots, k, v)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pools[self.group_of[layer]].read(self._slot[layer], slots)

    def read_blocks(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pools[self.group_of[layer]].read_blocks(self._slot[layer], tables)

    def bits(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each layer's keys and values [slots, KV, hd] as numpy arrays (see ``KVPool.bits``)."""
        groups = [pool.bits() for pool in self.pools]
        where = list(zip(self.group_of, self._slot))
        return [groups[g][0][j] for g, j in where], [groups[g][1][j] for g, j in where]


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
    """One row for each of B requests, attention batched over their padded block tables."""

    rows: torch.Tensor | slice  # [B] row indices (a slice when the decode rows are contiguous)
    tables: torch.Tensor  # [B, nb] block ids, padded with block 0
    length: int  # keys to attend: the longest request's length (<= nb * block_size)
    lengths: torch.Tensor  # [B] keys of each request, its new one included
    mask: torch.Tensor | None  # [B, 1, 1, length] bool, True where a key is visible; None: no padding


@dataclass
class Rows:
    positions: torch.Tensor  # [T] long
    write_slots: torch.Tensor  # [T] long
    sample_rows: torch.Tensor  # [S] long: the rows whose logits the last stage computes (each item's last ``outputs``)
    items: list[tuple[Sequence[int], int]]  # (block table, n) per item, in row order
    starts: list[int]  # each item's first position
    block_size: int
    prompt: bool = False  # the rows are prompt rows, not generated tokens (the fused path projects them apart)
    more: tuple["Rows", ...] = ()  # the same rows addressed by the other KV groups' tables (groups 1, 2, ...)

    def group(self, g: int) -> "Rows":
        """The rows as KV group ``g``'s block tables address them (``KVCache.group_of``)."""
        return self if g == 0 else self.more[g - 1]

    @classmethod
    def build(cls, parts: list[tuple[Sequence[int], int, int, int]], block_size: int, device: torch.device,
              prompt: bool = False, more: Sequence[Sequence[Sequence[int]]] = ()) -> "Rows":
        """parts: (block table, pos, n, outputs) per item, in row order (``outputs``: its last rows whose
        logits the last stage computes; 1 or True for the one it samples after); ``more``: per item, its
        block tables in the other KV groups (none: one group)."""
        positions, sample, offset = [], [], 0
        for _, pos, n, outputs in parts:
            positions.extend(range(pos, pos + n))
            sample.extend(range(offset + n - int(outputs), offset + n))
            offset += n
        items, starts = [(t, n) for t, _, n, _ in parts], [pos for _, pos, _, _ in parts]
        rows = cls(torch.tensor(positions, dtype=torch.long, device=device), _write_slots(items, starts, block_size, device),
                   torch.tensor(sample, dtype=torch.long, device=device), items, starts, block_size, prompt)
        if more:
            rows.more = tuple(rows._regrouped([(tables[g], n) for tables, (_, n) in zip(more, items)])
                              for g in range(len(more[0])))
        return rows

    def _regrouped(self, items: list[tuple[Sequence[int], int]]) -> "Rows":
        """The same rows addressed through other block tables (another KV group's), one per item."""
        slots = _write_slots(items, self.starts, self.block_size, self.positions.device)
        return replace(self, write_slots=slots, items=items, more=())

    @cached_property
    def prefills(self) -> list[Prefill]:
        """The items of several rows (the torch path's causal attention among them), in row order; built
        when first read (the fused path never reads it)."""
        out, offset, device = [], 0, self.positions.device
        for (table, n), pos in zip(self.items, self.starts):
            if n > 1:
                t = torch.tensor(table, dtype=torch.long)
                read = slots_for(t, torch.arange(pos + n), self.block_size).to(device) if pos else None
                out.append(Prefill(slice(offset, offset + n), pos, read))
            offset += n
        return out

    @cached_property
    def decode(self) -> Decode | None:
        """The items of one row (the torch path's batched decode attention), or None; built when first read."""
        dec, offset = [], 0
        for (table, n), pos in zip(self.items, self.starts):
            if n == 1:
                dec.append((offset, table[: pos // self.block_size + 1], pos + 1))
            offset += n
        return _decode(dec, self.positions.device) if dec else None

    def row_tables(self) -> np.ndarray:
        """[T, nb] int64: each row's block table (its item's, padded with block 0), for kernels that
        handle one row at a time."""
        tables = np.zeros((len(self.positions), max(len(t) for t, _ in self.items)), np.int64)
        row = 0
        for table, n in self.items:
            tables[row : row + n, : len(table)] = table
            row += n
        return tables


def _write_slots(items: list[tuple[Sequence[int], int]], starts: list[int], block_size: int,
                 device: torch.device) -> torch.Tensor:
    """[T] long: where each row writes its key and value (its block table's slot for its position)."""
    slots = [table[p // block_size] * block_size + p % block_size
             for (table, n), start in zip(items, starts) for p in range(start, start + n)]
    return torch.tensor(slots, dtype=torch.long, device=device)


def _decode(items: list[tuple[int, list[int], int]], device: torch.device) -> Decode:
    """items: (row, block table, length) per decoding request."""
    longest = max(n for _, _, n in items)
    tables = torch.zeros(len(items), max(len(t) for _, t, _ in items), dtype=torch.long)  # pad: block 0
    for i, (_, t, _) in enumerate(items):
        tables[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    lengths = torch.tensor([n for _, _, n in items])
    mask = (torch.arange(longest)[None, :] < lengths[:, None])[:, None, None, :] if lengths.min() < longest else None
    first = items[0][0]
    rows = [r for r, _, _ in items]
    contiguous = rows == list(range(first, first + len(rows)))
    index = slice(first, first + len(rows)) if contiguous else torch.tensor(rows, dtype=torch.long, device=device)
    return Decode(index, tables.to(device), longest, lengths.to(device), None if mask is None else mask.to(device))
