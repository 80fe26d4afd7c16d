"""Paged KV bookkeeping (backend-independent): a block allocator with a hash-chain prefix cache.

A request owns a *block table* (block ids in position order). Full blocks of a prompt are hashed
as a chain (hash of the previous block's hash + this block's token ids), so requests that share a
prefix share its blocks. Blocks nobody references stay cached in LRU order until reused.

A stage whose layers attend differently keeps one pool and one ``BlockManager`` per *KV group*
(``kv_groups``: its full-attention layers, and the layers of each sliding window) and a request one
table per group (``KVSpace``). A window group gives a request's blocks back as soon as no row of it
can read them again: its table then starts with ``NULL_BLOCK`` entries, which no row ever attends to.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

NULL_BLOCK = 0  # a window group's table entry for a block given back: read only under a mask, never written


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
    def lookup(self, hashes: Sequence[int]) -> list[int | None]:
        """The cached block of each chain hash (None: not cached; every one None without a prefix cache)."""
        if not self.prefix_cache:
            return [None] * len(hashes)
        return [self.by_hash.get(h) for h in hashes]

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
    def can_allocate(self, tokens: int, reuse: Sequence[int] = (), skip: int = 0) -> bool:
        return self.can_take(self.blocks_for(tokens) - skip - len(reuse), reuse)

    def can_take(self, new: int, reuse: Sequence[int] = ()) -> bool:
        """Whether ``new`` free blocks are left once the shared blocks ``reuse`` are taken."""
        reusable_free = sum(1 for b in reuse if self.ref[b] == 0)
        return new <= len(self.free) - reusable_free

    def allocate(self, tokens: int, reuse: Sequence[int] = (), skip: int = 0) -> list[int]:
        """A block table for ``tokens`` rows: ``skip`` ``NULL_BLOCK`` entries (blocks no row will read), then
        the shared blocks ``reuse``, then new ones."""
        if not self.can_allocate(tokens, reuse, skip):
            raise MemoryError("not enough free KV blocks")
        for b in reuse:
            self._take(b)
        new = self.blocks_for(tokens) - skip - len(reuse)
        return [NULL_BLOCK] * skip + list(reuse) + [self._take_free() for _ in range(new)]

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


# --- KV groups: layers that keep the same positions -------------------------------------------------
@dataclass(frozen=True)
class KVGroup:
    """Layers of a stage whose KV cache keeps the same positions: full attention (``window`` None, every
    position) or one sliding window (the last ``window`` positions a row attends to)."""

    window: int | None
    layers: tuple[int, ...]  # indices in the stage


def kv_groups(windows: Sequence[int | None]) -> tuple[KVGroup, ...]:
    """The stage's layers grouped by window (``windows``: each layer's, None: full attention): the
    full-attention layers first, then each window, the smallest first."""
    if not windows:
        raise ValueError("a stage has at least one layer")
    order = sorted(set(windows), key=lambda w: -1 if w is None else w)
    return tuple(KVGroup(w, tuple(i for i, x in enumerate(windows) if x == w)) for w in order)


def window_blocks(window: int, rows: int, block_size: int) -> int:
    """Blocks a request holds at most in a window group while it runs ``rows`` rows at once: the
    ``window - 1`` keys before its first row and the rows, wherever the blocks' borders fall."""
    return -(-(window - 1 + rows) // block_size) + 1


def split_blocks(groups: Sequence[KVGroup], kv_blocks: int, block_size: int, requests: int, step_rows: int) -> tuple[int, ...]:
    """Blocks of each group's pool from a budget of ``kv_blocks`` blocks of every layer. Each group gets
    ``kv_blocks`` (as many positions as the others), except beside full-attention layers: there a window
    group keeps what ``requests`` requests can hold at once while a step runs ``step_rows`` rows (a
    request holds at most ``window_blocks``), and the bytes it does not need go to the full group."""
    sizes = [kv_blocks] * len(groups)
    if groups[0].window is not None:  # only windows: each gets its share of the budget
        return tuple(sizes)
    spare = 0
    for g, group in enumerate(groups[1:], 1):
        need = requests * (window_blocks(group.window, 1, block_size) + 1) + -(-step_rows // block_size)
        sizes[g] = min(kv_blocks, need)
        spare += (kv_blocks - sizes[g]) * len(group.layers)
    sizes[0] += spare // len(groups[0].layers)
    return tuple(sizes)


@dataclass(slots=True)
class Tables:
    """A request's block tables, one per KV group, in position order; ``freed``: how many leading blocks
    of each it gave back (or never held: before the window of a cached prefix), ``NULL_BLOCK`` there."""

    tables: list[list[int]]
    freed: list[int]


@dataclass(frozen=True)
class Prefix:
    """A cached prompt prefix a request starts after: ``tokens`` (whole blocks) and, per group, the cached
    blocks its rows read (``reuse``) after ``skip`` blocks they never read (a window group's, before the
    window of the first row after the prefix)."""

    tokens: int
    skip: tuple[int, ...]
    reuse: tuple[tuple[int, ...], ...]


class KVSpace:
    """A stage's KV blocks: one ``BlockManager`` per KV group (``kv_groups``), a request's ``Tables`` in
    them. ``num_blocks``, ``used`` and ``cached`` count blocks of every layer of the stage (a group's block
    as its share of the layers): a one-group stage reads as its ``BlockManager``."""

    def __init__(self, groups: Sequence[KVGroup], sizes: Sequence[int], block_size: int, prefix_cache: bool = True):
        if len(groups) != len(sizes):
            raise ValueError(f"{len(groups)} KV groups, {len(sizes)} pool sizes")
        self.groups = tuple(groups)
        self.managers = [BlockManager(n, block_size, prefix_cache) for n in sizes]
        self.block_size, self.prefix_cache = block_size, prefix_cache
        self._layers = [len(g.layers) for g in groups]
        self._windows = [(g, group.window) for g, group in enumerate(groups) if group.window is not None]
        # a stage with one group (every stage of full layers) takes the shortest way through every step
        self._one = self.managers[0] if len(groups) == 1 else None
        self._only_full = self._one if not self._windows else None
        self.no_prefix = Prefix(0, (0,) * len(groups), ((),) * len(groups))

    def _in_stage_blocks(self, counts: Sequence[int]) -> int:
        return sum(n * layers for n, layers in zip(counts, self._layers)) // sum(self._layers)

    @property
    def num_blocks(self) -> int:
        return self._in_stage_blocks([m.num_blocks for m in self.managers])

    @property
    def used(self) -> int:
        return self._in_stage_blocks([m.used for m in self.managers])

    @property
    def cached(self) -> int:
        return self._in_stage_blocks([m.cached for m in self.managers])

    def _skip(self, g: int, blocks: int) -> int:
        """Leading blocks of a prefix of ``blocks`` blocks that the row after it never reads in group ``g``."""
        window = self.groups[g].window
        return 0 if window is None else max(0, blocks * self.block_size - window + 1) // self.block_size

    # --- prefix cache ---------------------------------------------------------------------------
    def cached_prefix(self, tokens: Sequence[int], limit: int) -> Prefix:
        """The longest cached prefix of ``tokens`` (at most ``limit`` tokens) whose blocks every group still
        holds where a later row reads them: all of them in the full group, the window's in a window group."""
        if not self.prefix_cache:
            return self.no_prefix
        hashes = block_hashes(tokens, self.block_size, limit // self.block_size)
        found = [m.lookup(hashes) for m in self.managers]
        runs = [_runs(f) for f in found]  # [g][i]: cached blocks in a row ending at block i
        top = len(hashes)
        if self.groups[0].window is None and 0 in runs[0]:  # the full group's cached prefix bounds it
            top = runs[0].index(0)
        for k in range(top, 0, -1):
            skip = [self._skip(g, k) for g in range(len(found))]
            if all(run[k - 1] >= k - s for run, s in zip(runs, skip)):
                return Prefix(k * self.block_size, tuple(skip), tuple(tuple(f[s:k]) for f, s in zip(found, skip)))
        return self.no_prefix

    # --- allocation -------------------------------------------------------------------------------
    def _ahead(self, g: int, tokens: int, prefix: Prefix, rows: int) -> int:
        """Rows group ``g`` holds blocks for at admission: all ``tokens`` in the full group, the first chunk
        of ``rows`` in a window group (it grows chunk by chunk, giving back what falls out of the window)."""
        return tokens if self.groups[g].window is None else min(tokens, prefix.tokens + rows)

    def can_allocate(self, tokens: int, prefix: Prefix, rows: int) -> bool:
        """Whether each group has the blocks a request of ``tokens`` rows after ``prefix``, run ``rows`` rows
        at a time, holds at most: all its blocks in the full group, ``window_blocks`` in a window group."""
        for g, m in enumerate(self.managers):
            window, skip, reuse = self.groups[g].window, prefix.skip[g], prefix.reuse[g]
            held = m.blocks_for(tokens) - skip
            if window is not None:
                held = min(held, window_blocks(window, rows, self.block_size))
            if not m.can_take(held - len(reuse), reuse):
                return False
        return True

    def allocate(self, tokens: int, prefix: Prefix, rows: int) -> Tables:
        if not self.can_allocate(tokens, prefix, rows):
            raise MemoryError("not enough free KV blocks")
        tables = [m.allocate(self._ahead(g, tokens, prefix, rows), prefix.reuse[g], prefix.skip[g])
                  for g, m in enumerate(self.managers)]
        return Tables(tables, list(prefix.skip))

    def can_grow(self, t: Tables, tokens: int) -> bool:
        if self._one is not None:
            return self._one.can_grow(t.tables[0], tokens)
        for m, table in zip(self.managers, t.tables):
            if not m.can_grow(table, tokens):
                return False
        return True

    def grow(self, t: Tables, tokens: int) -> None:
        """Extend every table so that it holds ``tokens`` rows."""
        if self._one is not None:
            return self._one.grow(t.tables[0], tokens)
        if not self.can_grow(t, tokens):
            raise MemoryError("not enough free KV blocks")
        for m, table in zip(self.managers, t.tables):
            m.grow(table, tokens)

    def computed(self, t: Tables, prompt: Sequence[int], registered: int, length: int) -> int:
        """After a step that left ``length`` rows computed: caches the prompt's full blocks from ``registered``
        on (returns the first block still to cache) and gives back the window groups' blocks that no later row
        reads (all its positions before ``length - window + 1``, where the next row's window starts)."""
        if self._only_full is not None:
            return self._only_full.register(t.tables[0], prompt, registered, length)
        for m, table, freed in zip(self.managers, t.tables, t.freed):
            m.register(table, prompt, max(registered, freed), length)
        for g, window in self._windows:
            keep = max(0, length - window + 1) // self.block_size  # the first block a later row reads
            freed = t.freed[g]
            if keep > freed:
                table = t.tables[g]
                self.managers[g].release(table[freed:keep])
                table[freed:keep] = [NULL_BLOCK] * (keep - freed)
                t.freed[g] = keep
        return max(registered, min(length, len(prompt)) // self.block_size)

    def release(self, t: Tables) -> None:
        for m, table, freed in zip(self.managers, t.tables, t.freed):
            m.release(table[freed:])


def _runs(found: Sequence[int | None]) -> list[int]:
    """[i]: how many blocks in a row up to block i (included) are cached."""
    runs, run = [], 0
    for block in found:
        run = run + 1 if block is not None else 0
        runs.append(run)
    return runs
