"""bf16 (the default dtype) on CPU: a request's greedy tokens depend on its prompt only, not on the
other requests of a step, their number or order, how its prompt was cut into chunks, or the split
into stages (the fused path computes every row on its own: ``stages/kernels.py``)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from parallax.broker.wire import SamplingParams
from parallax.stages import int4pack, int8dot, kernels
from parallax.stages.backend import SampleSpec, StepItem
from parallax.stages.engine import EngineConfig
from parallax.stages.kv import Rows
from parallax.stages.torch_backend import TorchBackend
from tests.cluster import Cluster, RowSteps, cluster, ids, make_tiny_model, record_steps

MODEL = "smollm2-135m"
NEW_TOKENS = 32
QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
    "Give me three tips for sleeping better.", "What is 17 times 23?", "Name five fruits.", "Who wrote Hamlet?",
    "Describe a cat in one sentence.", "What does a CPU do?", "Translate 'good morning' to French.",
    "Why is the sky blue?", "Tell me a short joke.", "What is the boiling point of water?", "List the planets.",
    "How do airplanes fly?", "What is machine learning?", "Suggest a name for a dog.", "What is DNA?",
    "How many days are in a leap year?", "Write a sentence about autumn.",
]


# --- backend level, a tiny random Llama (fast) ------------------------------------------------------


@pytest.fixture(scope="module", params=["bf16", int4pack.KERNEL, int8dot.KERNEL])
def tiny_first_stage(tmp_path_factory, request):
    """bf16 weights, or weights quantized to Q4_0 at load and held in torch's int4 layout or in the int8
    kernel's tiles (that kernel for every row)."""
    path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", layers=4)
    own = request.param if request.param != "bf16" else None
    with pytest.MonkeyPatch.context() as patch:  # the tuning picks neither: the one asked for is set below
        patch.setattr(int4pack, "eligible", lambda *a: False)
        patch.setattr(int8dot, "available", lambda *a: False)
        backend = TorchBackend.load(path, "tiny", 0, 2, "bfloat16", "cpu", quantize="q4_0" if own else None)
    if own:
        for m in kernels.tiled(kernels.projections(backend.model)):
            m.picks.update(decode=own, prefill=own)
            m.settle()
        assert all(m.repacked for m in kernels.tiled(kernels.projections(backend.model)))
    backend.init_kv(23 * 12, 4)
    assert backend.model.fused
    return backend


def test_a_rows_hidden_state_depends_on_its_request_only(tiny_first_stage):
    """Request A's hidden states (bits) alone, in one chunk, equal them beside other prompts and beside
    more than MAX_ROWS generated tokens, in chunks of 1, 16 and the rest (as a prefix-cache hit or a
    full step cuts a prompt), and its generated token's row alone equals it among 20 others."""
    backend, rng = tiny_first_stage, np.random.default_rng(0)
    prompts = {"a": rng.integers(1, 512, 40), "b": rng.integers(1, 512, 37), "c": rng.integers(1, 512, 3)}
    prompts |= {f"d{i}": rng.integers(1, 512, 5) for i in range(20)}
    steps = RowSteps(backend, prompts)
    item, hidden = steps.item, steps.hidden

    alone = hidden([item("a", 0, 40)])["a"]
    hidden([item(f"d{i}", 0, 5) for i in range(20)])
    decoders = [item(f"d{i}", 5, 1, token=7 + i) for i in reversed(range(20))]
    mixed = hidden(decoders + [item("b", 0, 37), item("a", 0, 40), item("c", 0, 3)])
    assert np.array_equal(mixed["a"], alone)
    decoders = [item(f"d{i}", 6, 1, token=3 + i) for i in range(20)]
    chunks = [hidden(decoders + [item("a", 0, 1)])["a"], hidden([item("a", 1, 16)])["a"],
              hidden([item("b", 37, 1, token=5), item("a", 17, 23), item("c", 3, 1, token=6)])["a"]]
    assert np.array_equal(np.concatenate(chunks), alone)
    token_alone = hidden([item("a", 40, 1, token=11)])["a"]
    decoders = [item(f"d{i}", 7, 1, token=9 + i) for i in range(20)]
    assert np.array_equal(hidden(decoders[:9] + [item("a", 40, 1, token=11)] + decoders[9:])["a"], token_alone)


# --- SmolLM2 through real stages -------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    """20 prompts: a long one (Z, several hundred tokens: still in prefill when the questions decode), 18 chat questions, and Z's first 33 tokens (P: with
    Z's first two blocks in the prefix cache, only its last token runs, a 1-row prompt chunk)."""
    tok = smollm2_tokenizer

    def chat(text):
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False)

    z = chat("Answer each of these questions in one word. " + " ".join(QUESTIONS * 4))  # long: still prefilling when the questions decode
    return [z] + [chat(q) for q in QUESTIONS[:18]] + [z[:33]]


@pytest.fixture(scope="module")
def one_stage(smollm2_path):
    backend = TorchBackend.load(smollm2_path, MODEL, 0, 30, "bfloat16", "cpu")
    backend.init_kv(64, 16)
    return backend


def generate_alone(backend: TorchBackend, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens of one request on one stage, no NATS: the prompt in one chunk, then one token a step."""
    table = tuple(range(-(-(len(prompt) + new_tokens) // backend.kv.block_size)))
    greedy = SampleSpec(SamplingParams(temperature=0.0, max_tokens=new_tokens), (), 0)
    tokens = list(backend.run([StepItem("alone", 0, len(prompt), ids(prompt), "int32", greedy, table, prompt=True)]).tokens)
    while len(tokens) < new_tokens:
        step = StepItem("alone", len(prompt) + len(tokens) - 1, 1, ids(tokens[-1:]), "int32", greedy, table, prompt=False)
        tokens += backend.run([step]).tokens
    return tokens


@pytest.fixture(scope="module")
def alone(one_stage, prompts):
    return [generate_alone(one_stage, p, NEW_TOKENS) for p in prompts]


@pytest.mark.slow
async def test_twenty_concurrent_requests_on_three_stages_equal_each_alone(nats_url, smollm2_path, prompts, alone):
    """3 bf16 stages; the first one sleeps 100 ms after each step, so that what arrives meanwhile
    shares its next step, and cuts prompts into chunks of 64. Z's long prompt starts; 17 questions
    arrive during its first chunk (prefilled together: 17 generated tokens a step from then on, beside
    Z's next chunks); once they decode, question Q and then P (Z's prefix + 1 token) arrive together:
    the first stage sends Q's chunk before P's 1-row chunk, the middle stage runs P's first (1-row
    items go with the generated tokens). Each request's tokens equal its tokens alone on one stage."""
    engine = EngineConfig(kv_blocks=512, max_tokens_per_step=1024, chunk_tokens=64)
    c = Cluster(nats_url, smollm2_path, MODEL, 30)
    try:
        first, middle, last = [await c.add_stage(a, b, "bfloat16", engine=engine, debug_delay_ms=100 if a == 0 else 0)
                               for a, b in [(0, 10), (10, 20), (20, 30)]]
        await c.connect()
        steps = record_steps(c)

        def start(prompt):
            return asyncio.create_task(c.generate(prompt, max_tokens=NEW_TOKENS, ignore_eos=True))

        async def until(condition):
            deadline = time.monotonic() + 120
            while not condition() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)

        tasks = [start(prompts[0])]
        await until(lambda: steps[first])  # the first stage is running Z's first chunk
        tasks += [start(p) for p in prompts[1:18]]
        await until(lambda: sum(1 for s in steps[last] for *_, prompt in s if not prompt) >= 2 * 17)
        tasks += [start(p) for p in prompts[18:]]
        together = await asyncio.gather(*tasks)
        preempted = sum(e.stats.preempted for e in c.engines())
    finally:
        await c.close()
    assert preempted == 0  # a preempted request is recomputed from its tokens: not this test's subject
    assert list(together) == alone
    assert len({tuple(t) for t in alone}) == len(prompts)

    every = [s for log in steps.values() for s in log]
    generated = [sum(1 for *_, prompt in s if not prompt) for s in every]
    prompt_rows = [sum(n for _, _, n, prompt in s if prompt) for s in every]
    assert max(generated) > kernels.MAX_ROWS, "no step had more generated tokens than one fused group takes"
    assert any(p > kernels.MAX_ROWS and g for p, g in zip(prompt_rows, generated)), "no prompt chunk ran beside generated tokens"
    assert any(n == 1 and prompt for s in every for _, _, n, prompt in s), "no 1-row prompt chunk"
    sent = {(rid, pos): (k, j) for k, s in enumerate(steps[first]) for j, (rid, pos, _, _) in enumerate(s)}
    order = [[sent[rid, pos] for rid, pos, _, _ in s] for s in steps[middle]]
    assert any(o != sorted(o) for o in order), "the middle stage ran every step in the order the first stage sent"


@pytest.mark.slow
async def test_two_stages_equal_one_stage(nats_url, smollm2_path, prompts, alone):
    async with cluster(nats_url, smollm2_path, MODEL, 30, [(0, 15), (15, 30)], dtype="bfloat16") as c:
        for prompt, expected in zip(prompts[:4], alone):
            assert await c.generate(prompt, max_tokens=NEW_TOKENS, ignore_eos=True) == expected


@pytest.mark.slow
def test_two_stage_hidden_states_are_the_one_stage_bits(smollm2_path, one_stage, prompts, monkeypatch):
    """Stage 0:15's output is bit for bit the 1-stage model's hidden state after layer 15, and stage
    15:30's logits are its logits: for a prompt and for three generated tokens."""
    split = [TorchBackend.load(smollm2_path, MODEL, a, b, "bfloat16", "cpu") for a, b in [(0, 15), (15, 30)]]
    for backend in split:
        backend.init_kv(16, 16)
    after: list[np.ndarray] = []
    fused_layer = kernels.fused_layer

    def recording(h, *args):
        fused_layer(h, *args)
        after.append(h.copy())

    def forward(backend, x, pos, prompt):
        rows = Rows.build([(tuple(range(16)), pos, len(x), True)], 16, torch.device("cpu"), prompt=prompt)
        rows.sample_rows = torch.arange(len(x))  # every row's logits
        with torch.inference_mode():
            return backend.model(x, rows, backend.kv)

    x, pos = torch.tensor(prompts[1]), 0
    for step in range(4):
        hidden = forward(split[0], x, pos, step == 0)
        logits = forward(split[1], hidden, pos, step == 0)
        after.clear()
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "fused_layer", recording)
            reference = forward(one_stage, x, pos, step == 0)
        assert len(after) == 30
        assert np.array_equal(hidden.float().numpy(), after[14])
        assert torch.equal(logits, reference)
        pos += len(x)
        x = logits[-1:].float().argmax(-1)
