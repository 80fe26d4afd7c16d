"""The KV block allocator and its prefix cache (pure Python, property-tested)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parallax.stages.blocks import BlockManager


def test_allocate_grow_release():
    bm = BlockManager(num_blocks=8, block_size=4)
    table = bm.allocate(10)  # 3 blocks
    assert len(table) == 3 and bm.used == 3
    assert bm.can_grow(table, 12) and bm.blocks_for(12) == 3
    bm.grow(table, 13)
    assert len(table) == 4
    assert not bm.can_allocate(17) and bm.can_allocate(16)
    bm.release(table)
    assert bm.used == 0
    with pytest.raises(MemoryError, match="not enough free KV blocks"):
        bm.allocate(33)


def test_prefix_is_shared_and_survives_release_until_evicted():
    bm = BlockManager(num_blocks=6, block_size=4)
    prompt = list(range(100, 111))  # 11 tokens: 2 full blocks + 3
    a = bm.allocate(len(prompt))
    assert bm.register(a, prompt, 0, computed=11) == 2
    hit = bm.cached_prefix(prompt + [7, 8], limit=12)
    assert hit == a[:2]
    b = bm.allocate(13, reuse=hit)
    assert b[:2] == a[:2] and bm.ref[a[0]] == 2
    bm.release(a)
    bm.release(b)
    assert bm.used == 0 and bm.cached == 2
    assert bm.cached_prefix(prompt, limit=10) == a[:2]  # still cached after both finished
    bm.allocate(24)  # takes every block: the cached ones are evicted
    assert bm.cached_prefix(prompt, limit=10) == []


def test_prefix_limit_and_mismatch():
    bm = BlockManager(num_blocks=8, block_size=4, prefix_cache=True)
    prompt = list(range(16))
    t = bm.allocate(16)
    bm.register(t, prompt, 0, computed=16)
    assert len(bm.cached_prefix(prompt, limit=15)) == 3  # the last token always runs
    assert bm.cached_prefix([99] + prompt[1:], limit=15) == []  # the chain breaks at block 0
    assert BlockManager(4, 4, prefix_cache=False).cached_prefix(prompt, 15) == []


def test_unfinished_blocks_are_not_cached():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(12))
    t = bm.allocate(12)
    assert bm.register(t, prompt, 0, computed=5) == 1  # one chunk of 5 rows computed so far
    assert len(bm.cached_prefix(prompt, 11)) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "grow", "free"]), st.integers(1, 40), st.integers(0, 3)), max_size=60))
def test_refcounts_never_break(ops):
    bm = BlockManager(num_blocks=16, block_size=4)
    prompts = [[p] * 40 for p in range(4)]
    live: list[tuple[list[int], int]] = []
    for op, n, p in ops:
        if op == "alloc":
            reuse = bm.cached_prefix(prompts[p], n - 1)
            if bm.can_allocate(n, reuse):
                table = bm.allocate(n, reuse)
                bm.register(table, prompts[p], len(reuse), n)
                live.append((table, n))
        elif op == "grow" and live:
            table, rows = live[-1]
            if bm.can_grow(table, rows + n):
                bm.grow(table, rows + n)
                live[-1] = (table, rows + n)
        elif op == "free" and live:
            bm.release(live.pop(0)[0])
        owners = [b for table, _ in live for b in table]
        assert all(bm.ref[b] == owners.count(b) for b in range(16))
        assert set(bm.free) == {b for b in range(16) if bm.ref[b] == 0}
        assert all(bm.hash_of[b] is not None for b in bm.by_hash.values())
