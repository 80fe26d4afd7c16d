"""A seed across a resume: token i of a request is drawn from (seed, i), so a seeded sampled stream
that is handed back mid-way and resumed on another replica gives exactly the undisturbed text."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
import torch

from parallax.broker.wire import Forward, ForwardItem, RequestMeta, SamplingParams, decode, encode
from parallax.stages.backend import SampleSpec
from parallax.stages.sampling import Sampler, token_seed
from tests.cluster import Cluster, make_tiny_model

LAYERS = 6
PROMPT = list(range(5, 25))
TOKENS = 60


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", layers=LAYERS)


def draws(sampler: Sampler, logits: torch.Tensor, params: SamplingParams, steps: range, rid: str = "r") -> list[int]:
    return [sampler.sample(logits, [rid], [SampleSpec(params, (), step)])[0] for step in steps]


def test_token_i_is_the_same_on_every_try():
    """Tokens 10..29 of a request drawn by a first try (steps 10..29) and by a try resumed after 10
    tokens (offset 10, steps 0..19) on another sampler are the same; another seed gives others."""
    logits = torch.zeros(1, 64)  # uniform: every draw is decided by the generator alone
    params = SamplingParams(temperature=1.0, seed=123, max_tokens=30)
    first = draws(Sampler(), logits, params, range(30))
    resumed = draws(Sampler(), logits, params.rest(10), range(20), rid="r~1")
    assert resumed == first[10:]
    assert len(set(first)) > 15  # not one token over and over
    assert draws(Sampler(), logits, params.model_copy(update={"seed": 124}), range(30)) != first
    assert token_seed(123, 10) != token_seed(123, 11) != token_seed(124, 10)
    assert 0 <= token_seed(-(2**80), 2**70) < 2**64  # any int a client sends


def test_an_unseeded_request_keeps_its_random_seed_until_released():
    logits, params = torch.zeros(1, 1000), SamplingParams(temperature=1.0, max_tokens=30)
    sampler = Sampler()
    once = draws(sampler, logits, params, range(30))
    assert draws(sampler, logits, params, range(30)) == once  # same request: same seed
    sampler.release("r")
    assert draws(sampler, logits, params, range(30)) != once  # a new request: a new seed


def test_the_offset_travels_only_on_a_resumed_try():
    """``rest`` counts on from the tokens so far (also when a resumed try is resumed again); a first
    try's header has no ``token_offset``, so stages of an earlier version still read it."""
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=30, min_tokens=4)
    assert params.rest(0) is params and params.first_index == 0
    again = params.rest(10).rest(5)
    assert (again.token_offset, again.max_tokens, again.min_tokens) == (15, 15, 0)
    with pytest.raises(ValueError):
        SamplingParams(token_offset=-1)

    def header(sampling: SamplingParams) -> dict:
        meta = RequestMeta(reply="r", chain=((0, 6),), route=("n",), sampling=sampling, prompt_ids=(1, 2))
        payload = encode(Forward(items=(ForwardItem(rid="x", pos=0, n=2, meta=meta),), dtype="int32", shape=(2,)), bytes(8))
        decoded, _ = decode(payload)
        assert decoded.items[0].meta.sampling == sampling
        return orjson.loads(payload[8 : 8 + int.from_bytes(payload[4:8], "big")])["items"][0]["meta"]["sampling"]

    assert "token_offset" not in header(params)
    assert header(params.rest(3))["token_offset"] == 3


async def stream(c: Cluster, seed: int):
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=TOKENS, ignore_eos=True)
    return c.pipeline.generate(uuid.uuid4().hex, PROMPT, params)


async def test_a_seeded_stream_resumed_on_a_replica_gives_the_undisturbed_text(nats_url, tiny):
    """float32, temperature 1, two replicas of 3:6: the replica serving a seeded stream leaves after
    ten tokens (hands it back: ``preempted``), the stream resumes on the other one with its tokens
    so far and ends with exactly the tokens of an undisturbed run. Seeded twice: the same tokens;
    another seed: other tokens."""
    c = Cluster(nats_url, tiny, "tiny", LAYERS)
    try:
        await c.add_stage(0, 3)
        replicas = [await c.add_stage(3, 6, debug_delay_ms=10) for _ in range(2)]
        await c.connect()
        while len(c.pipeline.registry.serving("tiny")) < 3:
            await asyncio.sleep(0.05)
        undisturbed = [e.token async for e in await stream(c, 7)]
        assert [e.token async for e in await stream(c, 7)] == undisturbed
        assert [e.token async for e in await stream(c, 8)] != undisturbed

        running = await stream(c, 7)
        tokens = [(await anext(running)).token for _ in range(10)]
        serving = next(n for n in replicas if c.stages[n][2].engine.seqs)
        other = c.stages[next(n for n in replicas if n != serving)][2].engine
        steps_before = other.stats.steps
        await c.stop_stage(serving)  # hands the request back; it resumes on the other replica
        tokens += [e.token async for e in running]
        assert other.stats.steps > steps_before + 10  # the rest was decoded there
        assert tokens == undisturbed
        assert len(set(undisturbed)) > 10  # sampled, not one token over and over
        assert await c.settled()
    finally:
        await c.close()
