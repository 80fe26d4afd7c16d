"""Paged KV bookkeeping (backend-independent): a block allocator with a hash-chain prefix cache.

A request owns a *block table* (block ids in position order). Full blocks of a prompt are hashed
as a chain (hash of the previous block's hash + this block's token ids), so requests that share a
prefix share its blocks. Blocks nobody references stay cached in LRU order until reused.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def block_hashes(tokens: Sequence[int], block_size: int, blocks: int) -> list[int]:
    """Chain hashes of the first ``blocks`` full blocks of ``tokens``."""
    hashes, prev = [], 0
    for i in range(blocks):
        prev = hash((prev, tuple(tokens[i * block_size : (i + 1) * block_size])))
        hashes.append(prev)
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size, self.prefix_cache = num_blocks, block_size, prefix_cache
        self.ref = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # ref == 0, LRU first
        self.hash_of: list[int | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def cached(self) -> int:
        return sum(1 for b in self.free if self.hash_of[b] is not None)

    # --- prefix cache ---------------------------------------------------------------------------
    def cached_prefix(self, tokens: Sequence[int], limit: int) -> list[int]:
        """Blocks holding the longest cached prefix of ``tokens`` (at most ``limit`` tokens)."""
        if not self.prefix_cache:
            return []
        found = []
        for h in block_hashes(tokens, self.block_size, limit // self.block_size):
            block = self.by_hash.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def register(self, table: Sequence[int], tokens: Sequence[int], start_block: int, computed: int) -> int:
        """Hash the full blocks of ``tokens`` whose KV is computed (``computed`` rows); returns the
        index of the first block still to register."""
        end = min(computed, len(tokens)) // self.block_size
        if not self.prefix_cache or end <= start_block:
            return max(start_block, end)
        for i, h in enumerate(block_hashes(tokens, self.block_size, end)[start_block:], start_block):
            if h not in self.by_hash and self.hash_of[table[i]] is None:
                self.by_hash[h] = table[i]
                self.hash_of[table[i]] = h
        return end

    # --- allocation -------------------------------------------------------------------------------
    def can_allocate(self, tokens: int, reuse: Sequence[int] = ()) -> bool:
        reusable_free = sum(1 for b in reuse if self.ref[b] == 0)
        return self.blocks_for(tokens) - len(reuse) <= len(self.free) - reusable_free

    def allocate(self, tokens: int, reuse: Sequence[int] = ()) -> list[int]:
        """A block table for ``tokens`` rows that starts with the shared blocks ``reuse``."""
        if not self.can_allocate(tokens, reuse):
            raise MemoryError("not enough free KV blocks")
        for b in reuse:
            self._take(b)
        return list(reuse) + [self._take_free() for _ in range(self.blocks_for(tokens) - len(reuse))]

    def can_grow(self, table: Sequence[int], tokens: int) -> bool:
        return self.blocks_for(tokens) - len(table) <= len(self.free)

    def grow(self, table: list[int], tokens: int) -> None:
        """Extend ``table`` in place so that it holds ``tokens`` rows."""
        if not self.can_grow(table, tokens):
            raise MemoryError("not enough free KV blocks")
        table.extend(self._take_free() for _ in range(self.blocks_for(tokens) - len(table)))

    def release(self, table: Sequence[int]) -> None:
        for b in reversed(table):  # the tail goes first so that a prefix is evicted last
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None

    def _take(self, block: int) -> None:
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1

    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)  # least recently freed
        if self.hash_of[block] is not None:
            del self.by_hash[self.hash_of[block]]
            self.hash_of[block] = None
        self.ref[block] = 1
        return block
