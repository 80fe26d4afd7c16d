"""What a decode step costs outside the model's math: the greedy sampler's fast path, a one-stage
chain feeding its own tokens back without NATS, and every step of a stage running in one thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from parallax.broker import subjects
from parallax.broker.wire import Forward, ForwardItem, RequestMeta, SamplingParams, Tokens, decode, encode
from parallax.stages.backend import SampleSpec
from parallax.stages.engine import Engine, EngineConfig
from parallax.stages.sampling import Sampler, greedy
from parallax.stages.torch_backend import TorchBackend
from tests.cluster import cluster, make_tiny_model, reference_greedy

LAYERS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", layers=LAYERS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_greedy_fast_path_is_torch_argmax(dtype):
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        logits = torch.randn(3, 2000, generator=g).mul(3).round().to(dtype)  # rounded: many ties
        if trial % 5 == 0:
            logits[1, 17] = logits[1, 900] = float("nan")
        if trial % 7 == 0:
            logits[2] = float("-inf")
        assert greedy(logits) == torch.argmax(logits.float(), dim=-1).tolist()


def test_sampler_greedy_over_steps_of_other_sizes():
    sampler, g = Sampler(), torch.Generator().manual_seed(1)
    spec = SampleSpec(SamplingParams(temperature=0), (), step=0)
    for rows in (1, 3, 1, 2, 2):  # the reused buffer follows the step's shape
        logits = torch.randn(rows, 500, generator=g).to(torch.bfloat16)
        assert sampler.sample(logits, ["r"] * rows, [spec] * rows) == torch.argmax(logits.float(), dim=-1).tolist()


def test_greedy_with_bans_or_penalty_still_takes_the_full_path():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]], dtype=torch.bfloat16)
    params = SamplingParams(temperature=0, stop_token_ids=(1,), min_tokens=2)
    assert Sampler().sample(logits, ["r"], [SampleSpec(params, (), step=0)]) == [2]  # the stop token is banned
    assert Sampler().sample(logits, ["r"], [SampleSpec(params, (), step=2)]) == [1]  # not any more
    penalty = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert Sampler().sample(logits, ["r"], [SampleSpec(penalty, (1,), step=0)]) == [2]  # 5 / 2 < 4


def _prompt_message(rid: str, prompt: list[int], chain, route, max_tokens: int) -> bytes:
    meta = RequestMeta(reply="gw.reply", chain=chain, route=route, prompt_ids=tuple(prompt),
                       sampling=SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    item = ForwardItem(rid=rid, pos=0, n=len(prompt), meta=meta)
    return encode(Forward(items=(item,), dtype="int32", shape=(len(prompt),)), np.asarray(prompt, "<i4").tobytes())


def test_one_stage_chain_feeds_its_tokens_back_without_a_message(tiny):
    backend = TorchBackend.load(tiny, "tiny", 0, LAYERS, "float32", "cpu")
    engine = Engine(backend, "solo", EngineConfig(kv_blocks=64, block_size=8))
    prompt = [5, 17, 3, 99, 42, 7]
    engine.submit(*decode(_prompt_message("r1", prompt, ((0, LAYERS),), ("solo",), 12)))
    own = subjects.node("tiny", 0, LAYERS, "solo")
    tokens, subjects_seen, steps = [], set(), 0
    while engine.has_work():
        for subject, payload in engine.step():
            subjects_seen.add(subject)
            header, _ = decode(payload)
            if isinstance(header, Tokens):
                tokens += [t.token for t in header.items]
        steps += 1
    assert own not in subjects_seen  # no round trip through NATS to itself
    assert subjects_seen == {"gw.reply", subjects.release("tiny")}
    assert steps == 12 and tokens == reference_greedy(tiny, prompt, 12)
    assert not engine.seqs and engine.blocks.used == 0


def test_last_stage_of_two_sends_its_tokens_to_the_first_before_the_gateway(tiny):
    backend = TorchBackend.load(tiny, "tiny", 2, LAYERS, "float32", "cpu")
    engine = Engine(backend, "tail", EngineConfig(kv_blocks=64, block_size=8))
    chain, route = ((0, 2), (2, LAYERS)), ("head", "tail")
    meta = RequestMeta(reply="gw.reply", chain=chain, route=route, prompt_ids=(1, 2, 3),
                       sampling=SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    hidden = torch.randn(3, backend.spec.hidden_size).numpy().tobytes()
    header = Forward(items=(ForwardItem(rid="r1", pos=0, n=3, meta=meta),), dtype="float32", shape=(3, backend.spec.hidden_size))
    engine.submit(*decode(encode(header, hidden)))
    steps = engine.step()
    assert [subject for subject, _ in steps] == [subjects.node("tiny", 0, 2, "head"), "gw.reply"]  # critical path first
    out = dict(steps)
    back = decode(out[subjects.node("tiny", 0, 2, "head")])[0]
    assert isinstance(back, Forward) and back.items[0].pos == 3 and back.items[0].n == 1
    assert not engine.has_work()  # the next row comes from the first stage


async def test_every_step_of_a_stage_runs_in_one_thread(nats_url, tiny):
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 2), (2, LAYERS)]) as c:
        seen: dict[str, set[int]] = {}
        for node_id, (_, _, worker) in c.stages.items():
            backend = worker.engine.backend

            def run(items, run=backend.run, threads=seen.setdefault(node_id, set())):
                threads.add(threading.get_ident())
                return run(items)

            backend.run = run
        for prompt in ([3, 1, 4, 1, 5], [9, 2, 6]):
            assert await c.generate(prompt, max_tokens=8, ignore_eos=True) == reference_greedy(tiny, prompt, 8)
    assert len(seen) == 2
    for threads in seen.values():  # one thread per stage, never the event loop's
        assert len(threads) == 1 and threading.get_ident() not in threads
