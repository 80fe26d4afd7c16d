"""logprobs, n > 1, echo (with the prompt tokens' logprobs), logit_bias and frequency / presence
penalties through the official openai client: the gateway app (in process, over an ASGI transport) on
a NatsPipeline, two stages of a tiny float32 Llama in process on a real nats-server, prompts cut into
chunks of ``CHUNK`` tokens. The references are computed here from transformers' float32 logits. The
tokenizer is a small byte-level BPE trained here (no SmolLM2 needed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import openai
import pytest
import pytest_asyncio
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from parallax.broker.wire import Forward, ForwardItem, RequestMeta, SamplingParams, TokenOut, Tokens, decode, encode
from parallax.gateway.app import create_app
from parallax.gateway.formats import TokenNames
from parallax.gateway.generation import choice_seed
from parallax.stages.backend import SampleSpec
from parallax.stages.engine import Engine, EngineConfig
from parallax.stages.sampling import Sampler, token_logprobs
from parallax.stages.torch_backend import TorchBackend
from tests.cluster import Cluster, make_tiny_model, record_steps
from tests.conftest import start_nats_server

in_module_loop = pytest.mark.asyncio(loop_scope="module")  # the tests that share the module's cluster
LAYERS = 4
BLOCK = 16  # EngineConfig's default block size: the prefix cache shares whole blocks
CHUNK = 16  # the first stage's prefill chunk (its smallest: one block)
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "Parallax serves language models over NATS. ",
          "Un café crème, s'il vous plaît. Größe: 日本語のテキスト 🎉 ✓ ", "numbers 0123456789 and words: hello world "]
CHAT = [{"role": "user", "content": "Tell me about the quick brown fox."}]
PROMPT = "Parallax serves language models over NATS. The quick brown fox jumps over the lazy dog."


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of ~400 tokens: multi-byte characters split over tokens, like real ones."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", layers=LAYERS, vocab=len(tokenizer))


@pytest.fixture(scope="module")
def reference(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def by_bytes(tokenizer) -> dict[bytes, int]:
    """Token id by its UTF-8 bytes (what chat logprobs report): unique in a byte-level BPE."""
    names = TokenNames(tokenizer)
    return {bytes(names(i)[1]): i for i in range(len(tokenizer))}


@pytest.fixture(scope="module")
def by_text(tokenizer) -> dict[str, int]:
    """Token id by the text completions' logprobs name it with."""
    names = TokenNames(tokenizer)
    return {names.text(i): i for i in range(len(tokenizer))}


@dataclass
class Stack:
    cluster: Cluster
    client: openai.AsyncOpenAI
    http: httpx.AsyncClient  # the same gateway app, for what the openai client does not send


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny, tokenizer) -> AsyncIterator[Stack]:
    server = start_nats_server()
    c = Cluster(server.url, tiny, "tiny", LAYERS)
    try:
        for a, b in [(0, 2), (2, LAYERS)]:
            await c.add_stage(a, b, engine=EngineConfig(kv_blocks=512, chunk_tokens=CHUNK))
        await c.connect()
        app = create_app(c.pipeline, tokenizer, "tiny", 4096, [tokenizer.eos_token_id])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
            yield Stack(c, openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="x", http_client=http,
                                              max_retries=0), http)
    finally:
        await c.close()
        server.stop()


def reference_logprobs(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log_softmax of transformers' float32 logits at each output position: [len(output), V]."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)


def chat_ids(tokenizer) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False),
                            add_special_tokens=False)


def check_against(expected: torch.Tensor, sampled: list[int], logprobs: list[float], tops: list[dict[int, float]]) -> None:
    """Each position's sampled logprob and top-k (ids and values) equal the reference within 1e-4."""
    assert len(sampled) == len(logprobs) == len(tops) == expected.shape[0]
    for row, token, logprob, top in zip(expected, sampled, logprobs, tops):
        assert abs(logprob - float(row[token])) < 1e-4
        values, ids = torch.topk(row, len(top))
        assert set(top) == set(ids.tolist())
        assert max(abs(lp - float(row[t])) for t, lp in top.items()) < 1e-4
        assert list(top.values()) == sorted(top.values(), reverse=True)


# --------------------------------------------------------------------------------------- logprobs
@in_module_loop
@pytest.mark.parametrize("stream", [False, True])
async def test_chat_logprobs_equal_the_reference(stack, reference, tokenizer, by_bytes, stream):
    client = stack.client
    args = dict(model="tiny", messages=CHAT, max_tokens=10, temperature=0.7, seed=5, logprobs=True, top_logprobs=5)
    if stream:
        entries, text = [], ""
        async for chunk in await client.chat.completions.create(**args, stream=True):
            for choice in chunk.choices:
                text += choice.delta.content or ""
                entries += choice.logprobs.content if choice.logprobs else []
    else:
        response = await client.chat.completions.create(**args)
        entries, text = response.choices[0].logprobs.content, response.choices[0].message.content
        assert response.usage.completion_tokens == len(entries)
    sampled = [by_bytes[bytes(e.bytes)] for e in entries]
    assert len(sampled) == 10 and len(set(sampled)) > 1
    assert b"".join(bytes(e.bytes) for e in entries).decode(errors="replace").startswith(text)
    tops = [{by_bytes[bytes(t.bytes)]: t.logprob for t in e.top_logprobs} for e in entries]
    assert all(len(top) == 5 for top in tops)
    check_against(reference_logprobs(reference, chat_ids(tokenizer), sampled), sampled, [e.logprob for e in entries], tops)


@in_module_loop
@pytest.mark.parametrize("stream", [False, True])
async def test_completion_logprobs_in_the_legacy_shape(stack, reference, tokenizer, by_text, stream):
    client = stack.client
    args = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0.8, seed=11, logprobs=3)
    if stream:
        text, lists = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        async for chunk in await client.completions.create(**args, stream=True):
            for choice in chunk.choices:
                text += choice.text
                for key in lists if choice.logprobs else ():
                    lists[key] += getattr(choice.logprobs, key)
    else:
        choice = (await client.completions.create(**args)).choices[0]
        text, lists = choice.text, choice.logprobs.model_dump()
    sampled = [by_text[t] for t in lists["tokens"]]
    assert len(sampled) == 8
    # each top_logprobs entry: the 3 most likely and the sampled token (when it is not one of them)
    tops = [{by_text[t]: lp for t, lp in top.items()} for top in lists["top_logprobs"]]
    assert all(s in top and len(top) == 3 + (s not in list(top)[:3]) for s, top in zip(sampled, tops))
    assert all(top[s] == lp for s, top, lp in zip(sampled, tops, lists["token_logprobs"]))
    expected = reference_logprobs(reference, tokenizer.encode(PROMPT), sampled)
    check_against(expected, sampled, lists["token_logprobs"], [dict(list(top.items())[:3]) for top in tops])
    offsets = lists["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    for token, offset in zip(lists["tokens"], offsets):
        if token.startswith("bytes:"):  # part of a character: the text from here on is not the tokens' alone
            break
        assert text[offset:].startswith(token)


def test_unused_features_leave_the_wire_as_it_was():
    """No logprobs are computed or sent unless asked, and the new sampling fields stay off the wire
    while unused (a stage of an earlier version reads the message)."""
    logits = torch.randn(3, 50)
    specs = [SampleSpec(SamplingParams(temperature=0), (), 0)] * 3
    assert token_logprobs(logits, specs, [1, 2, 3]) == ()
    frame = encode(Tokens(items=(TokenOut(rid="r", token=7, index=0),)))
    assert frame == b'PXW1\x00\x00\x00;{"kind":"tokens","items":[{"rid":"r","token":7,"index":0}]}'
    sent = SamplingParams(temperature=0.5, seed=3).model_dump(mode="json", exclude_none=True)
    assert not {"frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "prompt_logprobs", "token_offset"} & set(sent)


# ------------------------------------------------------------------------------------------ n > 1
@in_module_loop
async def test_n_seeded_samples_are_reproducible(stack):
    client = stack.client
    args = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=1234)
    first = await client.completions.create(**args, n=4)
    again = await client.completions.create(**args, n=4)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # every choice has its own seed
    single = await client.completions.create(**args)
    assert single.choices[0].text == texts[0]  # choice 0 keeps the request's seed
    assert first.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert first.usage.completion_tokens == 4 * 8
    assert choice_seed(1234, 0) == 1234 and len({choice_seed(1234, i) for i in range(4)}) == 4


@in_module_loop
async def test_greedy_n_choices_are_identical_and_share_the_prompt(stack):
    c, client = stack.cluster, stack.client
    steps = record_steps(c)
    prompt = [(i * 37) % 390 + 5 for i in range(3 * BLOCK + 5)]  # no other test's: three full blocks and a partial one
    response = await client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, n=3)
    assert len(response.choices) == 3 and len({ch.text for ch in response.choices}) == 1
    assert response.usage.prompt_tokens == len(prompt) and response.usage.completion_tokens == 18
    for node, log in steps.items():
        prefill_rows = sum(n for step in log for (_, _, n, is_prompt) in step if is_prompt)
        # the first choice computes the prompt; the two others only its partial last block
        assert prefill_rows == len(prompt) + 2 * 5, node
    assert await c.settled()


@in_module_loop
async def test_streamed_choices_carry_their_index(stack):
    client = stack.client
    args = dict(model="tiny", messages=CHAT, max_tokens=6, temperature=1.0, seed=99, n=3)
    whole = await client.chat.completions.create(**args)
    texts = {0: "", 1: "", 2: ""}
    finished = set()
    async for chunk in await client.chat.completions.create(**args, stream=True,
                                                           stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
        usage = chunk.usage or None
    assert finished == {0, 1, 2}
    assert texts == {ch.index: ch.message.content for ch in whole.choices}
    assert usage.completion_tokens == whole.usage.completion_tokens == 18


@in_module_loop
async def test_abort_ends_every_choice(stack):
    c, client = stack.cluster, stack.client
    long = dict(model="tiny", prompt=[5, 6, 7], max_tokens=3000, temperature=0, n=2, extra_body={"ignore_eos": True})
    request = asyncio.create_task(client.completions.create(**long))
    while len(c.pipeline._requests) < 2:
        await asyncio.sleep(0.01)
    request_id = min(c.pipeline._requests)  # "<id>", not "<id>.1"
    assert (await stack.http.post(f"/v1/requests/{request_id}/abort")).status_code == 200
    with pytest.raises(openai.APIStatusError, match="aborted") as info:
        await request
    assert info.value.status_code == 499
    assert await c.settled()


# ------------------------------------------------------------------------------------------- echo
@in_module_loop
@pytest.mark.parametrize("stream", [False, True])
async def test_echo_puts_the_prompt_before_each_choice(stack, stream):
    client = stack.client
    args = dict(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, n=2, echo=True)
    plain = (await client.completions.create(**{**args, "echo": False})).choices[0].text
    if stream:
        texts = {0: "", 1: ""}
        async for chunk in await client.completions.create(**args, stream=True):
            for choice in chunk.choices:
                texts[choice.index] += choice.text
    else:
        texts = {ch.index: ch.text for ch in (await client.completions.create(**args)).choices}
    assert texts == {0: PROMPT + plain, 1: PROMPT + plain}


@in_module_loop
@pytest.mark.parametrize("stream", [False, True])
async def test_echo_with_logprobs_gives_the_prompt_tokens_logprobs(stack, reference, tokenizer, by_text, stream):
    """The legacy lists start with the prompt's tokens (the first one has no logprob), each equal to the
    reference within 1e-4 over a prompt of several chunks; choice 1 shares choice 0's and uses the prefix
    cache. vLLM's ``prompt_logprobs`` (asked alongside) gives the same values, with each token's rank."""
    c, client = stack.cluster, stack.client
    prompt_text = PROMPT + " " + PROMPT[::-1] + (" stream" if stream else "")  # each run its own prompt: no cached prefix
    prompt = tokenizer.encode(prompt_text)
    assert len(prompt) > 3 * CHUNK
    steps = record_steps(c)
    args = dict(model="tiny", prompt=prompt_text, max_tokens=3, temperature=0, n=2, echo=True, logprobs=2,
                extra_body={"ignore_eos": True, "prompt_logprobs": 1})
    lists = {i: {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} for i in range(2)}
    texts, vllm = {0: "", 1: ""}, {0: [], 1: []}
    if stream:
        async for chunk in await client.completions.create(**args, stream=True):
            for choice in chunk.choices:
                texts[choice.index] += choice.text
                vllm[choice.index] += (choice.model_extra or {}).get("prompt_logprobs") or []
                for key in lists[choice.index] if choice.logprobs else ():
                    lists[choice.index][key] += getattr(choice.logprobs, key)
    else:
        response = await client.completions.create(**args)
        assert response.usage.prompt_tokens == len(prompt) and response.usage.completion_tokens == 6
        for choice in response.choices:
            texts[choice.index], lists[choice.index] = choice.text, choice.logprobs.model_dump()
            vllm[choice.index] = choice.model_extra["prompt_logprobs"]
    assert texts[0] == texts[1] and lists[0]["tokens"] == lists[1]["tokens"]
    assert {k: v[: len(prompt)] for k, v in lists[0].items()} == {k: v[: len(prompt)] for k, v in lists[1].items()}
    for got in lists.values():
        check_echoed(got, prompt, prompt_text, reference, by_text)
    assert vllm[0] == vllm[1] and len(vllm[0]) == len(prompt) and vllm[0][0] is None
    expected = reference_logprobs(reference, prompt[:1], prompt[1:])
    for token, row, entry, legacy in zip(prompt[1:], expected, vllm[0][1:], lists[0]["token_logprobs"][1:]):
        best = int(row.argmax())
        rank = entry[str(token)]["rank"]  # 1 + the tokens more likely (ties within 1e-4 either way)
        assert entry[str(token)]["logprob"] == legacy
        assert int((row > row[token] + 1e-4).sum()) + 1 <= rank <= int((row > row[token] - 1e-4).sum()) + 1
        assert entry[str(best)]["rank"] == 1 and abs(entry[str(best)]["logprob"] - float(row[best])) < 1e-4
        assert set(entry) == {str(token), str(best)}
    assert texts[0].startswith(prompt_text)
    first_stage = next(node for node in steps if node.startswith("s0-"))
    prefill = [n for step in steps[first_stage] for (_, _, n, is_prompt) in step if is_prompt]
    assert max(prefill) <= CHUNK and sum(prefill) == len(prompt) + len(prompt) % BLOCK  # choice 1: the partial block
    assert await c.settled()


def check_echoed(got: dict, prompt: list[int], prompt_text: str, reference, by_text) -> None:
    ids = [by_text[t] for t in got["tokens"]]
    assert ids[: len(prompt)] == prompt and len(ids) == len(prompt) + 3
    assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    expected = reference_logprobs(reference, prompt[:1], ids[1:])  # row i: the logprobs of token i + 1
    tops = [{by_text[t]: lp for t, lp in top.items()} for top in got["top_logprobs"][1:]]
    assert all(ids[i + 1] in top for i, top in enumerate(tops))  # the prompt's (or sampled) token is always there
    check_against(expected, ids[1:], got["token_logprobs"][1:],
                  [{t: lp for t, lp in top.items() if t in dict(list(top.items())[:2])} for top in tops])
    assert ids[len(prompt) :] == [int(row.argmax()) for row in expected[len(prompt) - 1 :]]  # greedy output
    offsets = got["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[len(prompt)] == len(prompt_text)


# ------------------------------------------------------------------------------ logit bias, penalties
@in_module_loop
async def test_logit_bias_forces_and_bans_tokens(stack, reference, tokenizer, by_text):
    client = stack.client
    prompt = tokenizer.encode(PROMPT)
    args = dict(model="tiny", prompt=prompt, max_tokens=5, temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    forced = by_text["fox"] if "fox" in by_text else 100
    result = (await client.completions.create(**args, logit_bias={str(forced): 100})).choices[0].logprobs
    assert [by_text[t] for t in result.tokens] == [forced] * 5
    greedy = (await client.completions.create(**args)).choices[0].logprobs
    first = by_text[greedy.tokens[0]]
    banned = (await client.completions.create(**args, logit_bias={str(first): -100})).choices[0].logprobs
    row = reference_logprobs(reference, prompt, [by_text[banned.tokens[0]]])[0]
    assert by_text[banned.tokens[0]] == int(torch.topk(row, 2).indices[1])  # the runner-up
    assert abs(banned.token_logprobs[0] - float(row[by_text[banned.tokens[0]]])) < 1e-4  # logprobs stay raw


def penalized_greedy(model, prompt: list[int], steps: int, frequency: float, presence: float) -> list[int]:
    """Greedy decoding by hand on transformers' logits: logit - frequency * count - presence * (count > 0)."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(torch.tensor([prompt + out])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
            out.append(int(torch.argmax(logits - frequency * counts - presence * (counts > 0))))
    return out


@in_module_loop
@pytest.mark.parametrize(("frequency", "presence"), [(1.5, 0.0), (0.0, 2.0), (-2.0, 0.5)])
async def test_penalties_equal_a_reference_by_hand(stack, reference, tokenizer, by_text, frequency, presence):
    client = stack.client
    prompt = tokenizer.encode("numbers 0123456789 and words")
    args = dict(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=0, extra_body={"ignore_eos": True})
    got = (await client.completions.create(**args, frequency_penalty=frequency, presence_penalty=presence)).choices[0]
    expected = penalized_greedy(reference, prompt, 12, frequency, presence)
    assert [by_text[t] for t in got.logprobs.tokens] == expected
    assert expected != penalized_greedy(reference, prompt, 12, 0.0, 0.0)  # the penalty changed the output


def test_penalties_count_the_tokens_of_earlier_tries(tiny, reference, tokenizer):
    """A resumed try (its prompt ends with the ``token_offset`` tokens generated before) penalizes them
    as output, as an undisturbed run would: in process, one stage's engine."""
    prompt, frequency, presence = tokenizer.encode("numbers 0123456789 and words"), 1.5, 0.5
    whole = penalized_greedy(reference, prompt, 10, frequency, presence)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, frequency_penalty=frequency,
                            presence_penalty=presence).rest(4)
    assert params.token_offset == 4 and params.max_tokens == 6
    backend = TorchBackend.load(tiny, "tiny", 0, LAYERS, "float32", "cpu")
    engine = Engine(backend, "solo", EngineConfig(kv_blocks=64, block_size=8))
    resumed = prompt + whole[:4]
    meta = RequestMeta(reply="gw", chain=((0, LAYERS),), route=("solo",), prompt_ids=tuple(resumed), sampling=params)
    item = ForwardItem(rid="r~1", pos=0, n=len(resumed), meta=meta)
    engine.submit(*decode(encode(Forward(items=(item,), dtype="int32", shape=(len(resumed),)),
                                 torch.tensor(resumed, dtype=torch.int32).numpy().tobytes())))
    tokens = []
    while engine.has_work():
        tokens += [t.token for subject, payload in engine.step() if isinstance(h := decode(payload)[0], Tokens) for t in h.items]
    assert tokens == whole[4:]
    assert whole[4:] != penalized_greedy(reference, resumed, 6, frequency, presence)  # counting only this try differs


def test_adjusted_rows_do_not_touch_the_others():
    """Bias and penalties apply per row of a batch: each row samples as it would alone."""
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    top = [int(t) for t in logits.argmax(-1)]
    specs = [SampleSpec(SamplingParams(temperature=0), (), 0),
             SampleSpec(SamplingParams(temperature=0, logit_bias={3: 100}), (), 0),
             SampleSpec(SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=1.0), (), 2, generated=(top[2],) * 2),
             SampleSpec(SamplingParams(temperature=0, repetition_penalty=3.0, logprobs=2), (top[3],), 0)]
    together = Sampler().sample(logits, list("abcd"), specs)
    assert together == [Sampler().sample(logits[i : i + 1], ["x"], [specs[i]])[0] for i in range(4)]
    assert together[0] == top[0] and together[1] == 3 and together[2] != top[2] and together[3] != top[3]
    assert Sampler().sample(logits, list("abcd"), [specs[0]] * 4) == top  # logits were not changed in place


# ------------------------------------------------------------------------------------ bad requests
@in_module_loop
@pytest.mark.parametrize(("endpoint", "body", "word"), [
    ("completions", dict(prompt="hi", logprobs=6), "logprobs"),
    ("completions", dict(prompt="hi", n=2, best_of=3), "best_of"),
    ("chat", dict(messages=CHAT, logprobs=True, top_logprobs=21), "top_logprobs"),
    ("chat", dict(messages=CHAT, top_logprobs=2), "logprobs: true"),
    ("chat", dict(messages=CHAT, logit_bias={"100000": 5}), "vocabulary"),
    ("chat", dict(messages=CHAT, frequency_penalty=2.5), "frequency_penalty"),
    ("chat", dict(messages=CHAT, n=65), "n"),
])
async def test_unsupported_combinations_get_a_clear_400(stack, endpoint, body, word):
    c, client = stack.cluster, stack.client
    create = client.completions.create if endpoint == "completions" else client.chat.completions.create
    with pytest.raises(openai.BadRequestError, match=word):
        await create(model="tiny", **body)
    assert await c.settled(timeout=0.5)
