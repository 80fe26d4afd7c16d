"""Continuous batching, chunked prefill, prefix cache and a bounded KV pool, over a real nats-server."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from parallax.broker.wire import SamplingParams
from parallax.stages.engine import EngineConfig
from tests.cluster import cluster, make_tiny_model, reference_greedy

LAYERS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", layers=LAYERS)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    return [[(seed * 31 + i * 13 + j * 7) % 500 + 1 for j in range(1 + (i * 37) % 90)] for i in range(count)]


def engines(c):
    return [w.engine for _, _, w in c.stages.values()]


async def test_sixteen_mixed_requests_at_once_equal_one_at_a_time(nats_url, tiny):
    batch = prompts(16)
    small_steps = EngineConfig(kv_blocks=512, max_tokens_per_step=64, chunk_tokens=32, block_size=8)
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 2), (2, 6)], engine=small_steps) as c:
        alone = [await c.generate(p, max_tokens=20) for p in batch]
        steps_alone = engines(c)[0].stats.steps
        together = await asyncio.gather(*(c.generate(p, max_tokens=20) for p in batch))
        steps_together = engines(c)[0].stats.steps - steps_alone
    assert list(together) == alone
    assert steps_together < steps_alone / 4  # they really shared forwards
    assert alone[3] == reference_greedy(tiny, batch[3], 20)


async def test_long_prompt_is_chunked_and_decode_keeps_flowing(nats_url, tiny):
    long_prompt = [(i * 11) % 500 + 1 for i in range(600)]
    config = EngineConfig(kv_blocks=512, max_tokens_per_step=40, chunk_tokens=32, block_size=16)
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3), (3, 6)], engine=config) as c:
        stream = c.pipeline.generate("runner", [5, 6, 7], SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True))
        await stream.__anext__()
        before = engines(c)[0].stats.steps
        long_task = asyncio.create_task(c.generate(long_prompt, max_tokens=3))
        seen = 0
        while not long_task.done():
            await stream.__anext__()
            seen += 1
        await stream.aclose()
        chunk_steps = engines(c)[0].stats.steps - before
        got = await long_task
    assert got == reference_greedy(tiny, long_prompt, 3)
    assert chunk_steps >= 600 // 32  # the prompt went through in chunks ...
    # ... while the running stream kept going: one token per trip around the 2-stage pipeline,
    # i.e. about every second chunk step (a prefill in one piece would have stalled it)
    assert seen >= chunk_steps // 5


async def test_prefix_cache_shares_a_long_system_prompt(nats_url, tiny):
    system = [(i * 3) % 500 + 1 for i in range(200)]
    a, b = system + [11, 12, 13], system + [21, 22]
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3), (3, 6)]) as c:
        assert await c.generate(a, max_tokens=8) == reference_greedy(tiny, a, 8)
        hits = [e.stats.prefix_hit_tokens for e in engines(c)]
        assert await c.generate(b, max_tokens=8) == reference_greedy(tiny, b, 8)
        gained = [e.stats.prefix_hit_tokens - h for e, h in zip(engines(c), hits)]
    assert gained == [192, 192]  # 12 full blocks of 16, on every stage


async def test_no_prefix_cache_flag(nats_url, tiny):
    system = [(i * 3) % 500 + 1 for i in range(100)]
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 6)], engine=EngineConfig(kv_blocks=64, prefix_cache=False)) as c:
        await c.generate(system + [1], max_tokens=2)
        await c.generate(system + [2], max_tokens=2)
        assert engines(c)[0].stats.prefix_hit_tokens == 0


async def test_prefix_miss_on_a_later_stage_is_retried_without_the_cache(nats_url, tiny):
    system = [(i * 5) % 500 + 1 for i in range(100)]
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3), (3, 6)]) as c:
        await c.generate(system + [1], max_tokens=2)
        later = engines(c)[1]
        for blocks in later.blocks.managers:  # the second stage forgot the prefix (as if evicted)
            blocks.by_hash.clear()
            blocks.hash_of = [None] * blocks.num_blocks
        assert await c.generate(system + [2], max_tokens=6) == reference_greedy(tiny, system + [2], 6)


async def test_full_kv_pool_queues_and_preempts_but_everyone_finishes(nats_url, tiny):
    """12 blocks of 16 rows (192 tokens) for 8 requests of ~60 tokens: they wait or get preempted
    and recomputed, never crash, and all produce the reference tokens."""
    batch = [[(i * 7 + j) % 500 + 1 for j in range(40)] for i in range(8)]
    config = EngineConfig(kv_blocks=12, block_size=16, max_tokens_per_step=128)
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3), (3, 6)], engine=config) as c:
        results = await asyncio.gather(*(c.generate(p, max_tokens=20) for p in batch))
        assert await c.settled()  # every block back in the pool
        preempted = sum(e.stats.preempted for e in engines(c))
    assert list(results) == [reference_greedy(tiny, p, 20) for p in batch]
    assert preempted > 0


async def test_preempted_requests_keep_max_and_min_tokens(nats_url, tiny):
    """A preempted request is resubmitted with its tokens so far and the rest of its limits
    (``SamplingParams.rest``): the same tokens as alone, exactly max_tokens of them, and its stop
    token still banned until min_tokens counts the tokens of every attempt."""
    batch = [[(i * 7 + j) % 500 + 1 for j in range(40)] for i in range(8)]
    stops = list(range(48, 512))  # most of the vocabulary: unbanned, a stop would end a request at once
    config = EngineConfig(kv_blocks=12, block_size=16, max_tokens_per_step=128)
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3), (3, 6)], engine=config) as c:
        def ask(prompt: list[int]):
            return c.generate(prompt, max_tokens=20, min_tokens=20, stop_token_ids=stops)

        alone = [await ask(p) for p in batch]
        before = sum(e.stats.preempted for e in engines(c))
        together = await asyncio.gather(*(ask(p) for p in batch))
        preempted = sum(e.stats.preempted for e in engines(c)) - before
        assert await c.settled()
    assert preempted > 0
    assert list(together) == alone
    assert all(len(tokens) == 20 and max(tokens) < stops[0] for tokens in alone)
    assert len({tuple(t) for t in alone}) > 1


async def test_prompt_larger_than_the_kv_pool_is_refused(nats_url, tiny):
    from parallax.broker.errors import StageFailed

    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 6)], engine=EngineConfig(kv_blocks=2, block_size=16)) as c:
        with pytest.raises(StageFailed, match="does not fit"):
            await c.generate(list(range(1, 60)), max_tokens=2)
        assert await c.generate([1, 2, 3], max_tokens=2)


async def test_released_request_frees_its_blocks(nats_url, tiny):
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3), (3, 6)]) as c:
        stream = c.pipeline.generate(uuid.uuid4().hex, list(range(1, 50)), SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True))
        await stream.__anext__()
        assert all(e.blocks.used > 0 for e in engines(c))
        await stream.aclose()
        assert await c.settled()
