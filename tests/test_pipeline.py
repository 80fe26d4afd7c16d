"""Stages over a real nats-server, in process: exactness, concurrency, sampling, bad input, faults."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

import nats
import orjson
import pytest
from pydantic import ValidationError

from parallax.broker import subjects
from parallax.broker.errors import ChainUnavailable, StageFailed, WireError
from parallax.broker.registry import DEAD_NODE_NOTICED_S
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
    """Two replicas of 3:6 share the work through the gateway's routing: it pins each request to a
    replica by load, and every decode step of a request goes to that replica (which holds its KV).
    The prompts share no prefix: a prompt whose prefix the first stage cached for a request on the other
    replica is resubmitted without the cache ("prefix_miss", tests/test_batching.py), a second route."""
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3), (3, 6), (3, 6)]) as c:
        results = await asyncio.gather(*(c.generate(p, max_tokens=40) for p in PROMPTS))
        assert results == references
        replicas = {n: w.engine for n, (_, _, w) in c.stages.items() if n.startswith("s3-6")}
        routed = c.pipeline.routes.routed
        assert sum(routed[n] for n in replicas) == len(PROMPTS) and all(routed[n] >= 1 for n in replicas), routed
        assert all(e.stats.rows > 0 for e in replicas.values())  # both replicas really ran requests
        assert all(e.backend.sampler._seeds == {} for e in replicas.values())  # nothing kept per request
        assert await c.settled()


async def test_the_last_stage_decides_finish(nats_url, tiny, references):
    """``finish`` comes from the last stage: "length" at max_tokens, "stop" on a stop token, and a
    stop token is never sampled before min_tokens (the sampler bans it)."""
    prompt, reference = PROMPTS[1], references[1]
    stop = reference[5]
    first = reference.index(stop)

    async def finishes(**params) -> tuple[list[int], list[str | None]]:
        events = [e async for e in c.pipeline.generate(uuid.uuid4().hex, prompt, SamplingParams(temperature=0.0, **params))]
        return [e.token for e in events], [e.finish for e in events]

    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3), (3, 6)]) as c:
        assert await finishes(max_tokens=7) == (reference[:7], [None] * 6 + ["length"])
        assert await finishes(max_tokens=40, stop_token_ids=[stop]) == (reference[: first + 1], [None] * first + ["stop"])
        tokens, reasons = await finishes(max_tokens=40, stop_token_ids=[stop], min_tokens=first + 2)
        assert tokens[:first] == reference[:first] and stop not in tokens[: first + 2]
        assert reasons == [None] * (len(tokens) - 1) + ["stop" if tokens[-1] == stop else "length"]
        assert len(tokens) == 40 or tokens[-1] == stop


def test_the_wire_pins_every_hop():
    """A route names one node per hop: no "any replica" entry, no route rewrite on the way."""
    meta = dict(reply="r", chain=((0, 3), (3, 6)), sampling=SamplingParams(), prompt_ids=(1, 2))
    assert RequestMeta(**meta, route=("a", "b")).route == ("a", "b")
    for route in [(None, "b"), ("a",), ("a", "")]:
        with pytest.raises(ValidationError):
            RequestMeta(**meta, route=route)
    fwd = {"kind": "fwd", "items": [{"rid": "x", "pos": 0, "n": 1, "route": ["a", "b"]}], "dtype": "int32", "shape": [1]}
    tokens = {"kind": "tokens", "items": [{"rid": "x", "token": 5, "index": 0, "route": ["a", "b"]}]}
    for header, data in [(fwd, b"\0" * 4), (tokens, b"")]:
        with pytest.raises(WireError, match="route"):
            decode(raw(header, data))
        del header["items"][0]["route"]
        decode(raw(header, data))  # the same message without a route is fine


def raw(header: dict, data: bytes) -> bytes:
    """A payload built by hand, to send what ``encode`` would refuse to write."""
    head = orjson.dumps(header)
    return b"PXW1" + len(head).to_bytes(4, "big") + head + data


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
        head, tail = c.stages  # s0-3-..., s3-6-...
        first, second = subjects.node("tiny", 0, 3, head), subjects.node("tiny", 3, 6, tail)
        reply = await nc.request(first, b"garbage", timeout=5)
        err, _ = decode(reply.data)
        assert isinstance(err, ErrorMsg) and "malformed" in err.message
        for junk in [b"PXW1\x00\x00\x00\x05{bad}", b"PXW1\x00\x00\xff\xff{}", encode(ErrorMsg(message="x"))]:
            await nc.publish(first, junk)
        # wrong tensor for the stage (token ids to a middle stage) -> error to the request's reply subject
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        meta = RequestMeta(reply=inbox, chain=((0, 3), (3, 6)), route=(head, tail), sampling=SamplingParams(), prompt_ids=(1, 2))
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
        # a request whose route pins the first hop to another replica
        meta = meta.model_copy(update={"chain": ((0, 3), (3, 6)), "route": ("elsewhere", tail)})
        bad = Forward(items=(ForwardItem(rid="bad3", pos=0, n=2, meta=meta),), dtype="int32", shape=(2,))
        await nc.publish(first, encode(bad, b"\x00" * 8))
        err, _ = decode((await sub.next_msg(timeout=5)).data)
        assert isinstance(err, ErrorMsg) and "pins layers 0:3 to elsewhere" in err.message
        assert await c.generate(PROMPTS[1], max_tokens=40) == references[1]


async def test_stage_dying_mid_request_fails_fast_without_a_replica(nats_url, tiny):
    """The only replica of 3:6 dies: the request waits ``chain_wait_s`` for another one, then fails."""
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3), (3, 6)]) as c:
        wait_s = 1.0
        c.pipeline.config = replace(c.pipeline.config, chain_wait_s=wait_s)
        stream = c.pipeline.generate(uuid.uuid4().hex, [1, 2, 3], SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True))
        await stream.__anext__()
        victim = next(n for n in c.stages if n.startswith("s3-6"))
        await c.kill_stage(victim)
        started = time.monotonic()
        with pytest.raises(StageFailed, match=f"{victim} serving layers 3:6 stopped.*no stage served layers 3:6 again within 1 s"):
            async for _ in stream:
                pass
        assert time.monotonic() - started < DEAD_NODE_NOTICED_S + wait_s  # the README's bound


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
