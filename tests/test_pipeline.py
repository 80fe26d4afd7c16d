"""Stages over a real nats-server, in process: exactness, concurrency, sampling, bad input, faults."""

from __future__ import annotations

import asyncio
import time
import uuid

import nats
import pytest

from parallax.broker import subjects
from parallax.broker.errors import ChainUnavailable, StageFailed
from parallax.broker.wire import ErrorMsg, Forward, ForwardItem, RequestMeta, SamplingParams, decode, encode
from tests.cluster import cluster, make_tiny_model, reference_greedy

LAYERS = 6
PROMPTS = [[7], list(range(5, 25)), [(i * 37) % 500 + 3 for i in range(150)], [42, 42, 42, 42, 9]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", layers=LAYERS)


@pytest.fixture(scope="module")
def references(tiny):
    return [reference_greedy(tiny, p, 40) for p in PROMPTS]


def test_references_are_not_degenerate(references):
    assert all(len(set(r)) > 10 for r in references)  # a test model that repeats one token proves little


@pytest.mark.parametrize("ranges", [[(0, 3), (3, 6)], [(0, 2), (2, 3), (3, 6)], [(0, 6)]], ids=["2-stage", "3-stage", "1-stage"])
async def test_split_equals_single_process(nats_url, tiny, references, ranges):
    async with cluster(nats_url, tiny, "tiny", LAYERS, ranges) as c:
        for prompt, expected in zip(PROMPTS, references):
            assert await c.generate(prompt, max_tokens=40) == expected


async def test_concurrent_requests_equal_one_at_a_time(nats_url, tiny):
    prompts = [[(i * 13 + j * 7) % 500 + 1 for j in range(3 + 5 * i)] for i in range(8)]
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 2), (2, 6)]) as c:
        alone = [await c.generate(p, max_tokens=24) for p in prompts]
        together = await asyncio.gather(*(c.generate(p, max_tokens=24) for p in prompts))
    assert list(together) == alone
    assert len({tuple(t) for t in alone}) == len(prompts)


async def test_replicas_share_work_and_pin_decode(nats_url, tiny, references):
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3), (3, 6), (3, 6)]) as c:
        results = await asyncio.gather(*(c.generate(PROMPTS[1], max_tokens=40) for _ in range(6)))
        assert all(r == references[1] for r in results)
        replicas = [w.engine for n, (_, _, w) in c.stages.items() if n.startswith("s3-6")]
        assert all(e.backend.sampler._generators == {} for e in replicas)
        assert await c.settled()


async def test_sampling_seed_and_stops(nats_url, tiny, references):
    prompt = PROMPTS[1]
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3), (3, 6)]) as c:
        a = await c.generate(prompt, temperature=1.0, seed=7, max_tokens=20)
        b = await c.generate(prompt, temperature=1.0, seed=7, max_tokens=20, top_p=1.0)
        other = await c.generate(prompt, temperature=1.0, seed=8, max_tokens=20)
        assert a == b and a != other
        assert await c.generate(prompt, temperature=0.7, top_k=1, seed=3, max_tokens=20) == references[1][:20]
        stop = references[1][5]
        first = references[1].index(stop)
        assert await c.generate(prompt, max_tokens=40, stop_token_ids=[stop]) == references[1][: first + 1]
        assert await c.generate(prompt, max_tokens=12, stop_token_ids=[stop], ignore_eos=True) == references[1][:12]
        banned = await c.generate(prompt, max_tokens=12, stop_token_ids=[stop], min_tokens=12)
        assert len(banned) == 12 and stop not in banned
        penalized = await c.generate(prompt, max_tokens=40, repetition_penalty=1.5)
        assert penalized != references[1]


async def test_chunked_long_prompt(nats_url, tiny):
    """A prompt whose activations exceed max_payload (1 MiB) is split and joined on every hop."""
    prompt = [(i * 7919) % 500 + 1 for i in range(3000)]  # 3000 x 64 floats = 768 KB ids/hidden per hop
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3), (3, 6)]) as c:
        c.nc._max_payload = 256 * 1024  # force several chunks on this client too
        for _, _, w in c.stages.values():
            w.nc._max_payload = 256 * 1024
        got = await c.generate(prompt, max_tokens=4)
    assert got == reference_greedy(tiny, prompt, 4)


async def test_missing_ranges_named(nats_url, tiny):
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 2)]) as c:
        assert c.pipeline.missing() == [(2, 6)]
        with pytest.raises(ChainUnavailable, match="2:6"):
            await c.generate([1, 2, 3], max_tokens=2)
        await c.add_stage(2, 6)
        await asyncio.sleep(0.3)
        assert c.pipeline.missing() == []
        assert len(await c.generate([1, 2, 3], max_tokens=2)) == 2


async def test_malformed_messages_do_not_kill_a_stage(nats_url, tiny, references):
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3), (3, 6)]) as c:
        nc = c.nc
        first, second = subjects.layers("tiny", 0, 3), subjects.layers("tiny", 3, 6)
        reply = await nc.request(first, b"garbage", timeout=5)
        err, _ = decode(reply.data)
        assert isinstance(err, ErrorMsg) and "malformed" in err.message
        for junk in [b"PXW1\x00\x00\x00\x05{bad}", b"PXW1\x00\x00\xff\xff{}", encode(ErrorMsg(message="x"))]:
            await nc.publish(first, junk)
        # wrong tensor for the stage (token ids to a middle stage) -> error to the request's reply subject
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        meta = RequestMeta(reply=inbox, chain=((0, 3), (3, 6)), route=(None, None), sampling=SamplingParams(), prompt_ids=(1, 2))
        bad = Forward(items=(ForwardItem(rid="bad", pos=0, n=2, meta=meta),), dtype="int32", shape=(2,))
        await nc.publish(second, encode(bad, b"\x00" * 8))
        err, _ = decode((await sub.next_msg(timeout=5)).data)
        assert isinstance(err, ErrorMsg) and "hidden states" in err.message
        # a request with a chain that this model does not have
        meta = meta.model_copy(update={"chain": ((0, 2), (2, 6))})
        bad = Forward(items=(ForwardItem(rid="bad2", pos=0, n=2, meta=meta),), dtype="int32", shape=(2,))
        await nc.publish(first, encode(bad, b"\x00" * 8))
        err, _ = decode((await sub.next_msg(timeout=5)).data)
        assert isinstance(err, ErrorMsg) and "not in the request's chain" in err.message
        assert await c.generate(PROMPTS[1], max_tokens=40) == references[1]


async def test_stage_dying_mid_request_fails_fast(nats_url, tiny):
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3), (3, 6)]) as c:
        stream = c.pipeline.generate(uuid.uuid4().hex, [1, 2, 3], SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True))
        await stream.__anext__()
        victim = next(n for n in c.stages if n.startswith("s3-6"))
        await c.kill_stage(victim)
        started = time.monotonic()
        with pytest.raises(StageFailed, match="stopped"):
            async for _ in stream:
                pass
        assert time.monotonic() - started < 10


async def test_abandoned_request_is_released(nats_url, tiny):
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3), (3, 6)]) as c:
        stream = c.pipeline.generate("abandon", [1, 2, 3], SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True))
        for _ in range(3):
            await stream.__anext__()
        assert any(w.engine.seqs for _, _, w in c.stages.values())
        await stream.aclose()
        assert await c.settled()


async def test_registry_sees_stages_started_before_the_gateway(nats_url, tiny):
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3), (3, 6)]):
        nc = await nats.connect(nats_url)
        try:
            from parallax.gateway.nats_pipeline import NatsPipeline, PipelineConfig

            late = NatsPipeline(nc, PipelineConfig(model="tiny", num_layers=LAYERS))
            await late.start()
            assert late.missing() == []
        finally:
            await nc.close()


async def test_registry_with_no_stages_logs_nothing_bad(nats_url, caplog):
    nc = await nats.connect(nats_url)
    try:
        from parallax.gateway.nats_pipeline import NatsPipeline, PipelineConfig

        lonely = NatsPipeline(nc, PipelineConfig(model="tiny", num_layers=LAYERS))
        await lonely.start()
        assert lonely.missing() == [(0, LAYERS)]
        assert "bad node entry" not in caplog.text
        await lonely.close()
    finally:
        await nc.close()
