"""Tool calling: the parsers of each template family on scripted outputs (whole and streamed), scripted
outputs whose markers are special tokens of a tiny tokenizer through the gateway app (a scripted
pipeline), and a round trip through the official openai client against a real cluster (gateway app in
process over a real nats-server, one stage) serving a random tiny Llama whose tokenizer has a
Hermes-style chat template. A random model never calls a tool by itself: a named or required
tool_choice makes the mask write the call."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import pytest_asyncio
from transformers import AutoTokenizer

from parallax.broker.model import eos_token_ids
from parallax.gateway.app import create_app
from parallax.gateway.chat import encode_chat
from parallax.gateway.protocol import ChatMessage
from parallax.gateway.detok import IncrementalDetokenizer
from parallax.gateway.tools import Harmony, Hermes, Llama3Json, Mistral, ToolStream, format_of, parse_all, special_ids

from .cluster import cluster
from .conftest import start_nats_server

MODEL, LAYERS = "tiny", 6
HERMES = """{%- if tools %}<|im_start|>system
You may call functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Return each call as <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

HARMONY = ("{%- if tools %}<|start|>developer<|message|>namespace functions {{ tools | tojson }}<|end|>{% endif %}"
           "{%- for m in messages %}{%- if m.tool_calls %}{%- for c in m.tool_calls %}<|start|>assistant<|channel|>commentary"
           " to=functions.{{ c.function.name }} <|constrain|>json<|message|>{{ c.function.arguments | tojson }}<|call|>"
           "{%- endfor %}{%- else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{%- endif %}{% endfor %}"
           "{%- if add_generation_prompt %}<|start|>assistant{% endif %}")
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}}}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["a", "b"],
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                       "b": {"type": "integer", "minimum": 0, "maximum": 99}}}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


# ------------------------------------------------------------------------- parsers, no cluster
def test_format_is_picked_from_the_template() -> None:
    assert isinstance(format_of(HERMES), Hermes)
    assert isinstance(format_of("{{ tools }} [TOOL_CALLS] {{ messages }}"), Mistral)
    assert isinstance(format_of('{{ tools }} <|python_tag|> {"name": ..., "parameters": ...}'), Llama3Json)
    assert isinstance(format_of(HARMONY), Harmony)
    assert format_of("{{ messages }}") is None


@pytest.mark.parametrize("fmt, text, content, calls", [
    (Hermes(), 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
     "Let me check.\n", [("get_weather", {"city": "Paris", "unit": "C"}), ("add", {"a": 1, "b": 2})]),
    (Llama3Json(), '{"name": "add", "parameters": {"a": 1, "b": 2}}', "", [("add", {"a": 1, "b": 2})]),
    (Llama3Json(), '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", "parameters": {}}',
     "", [("add", {"a": 1, "b": 2}), ("add", {})]),
    (Mistral(), '[TOOL_CALLS][{"name": "add", "arguments": {"a": 3, "b": 4}}]', "", [("add", {"a": 3, "b": 4})]),
    # unparseable output stays text
    (Hermes(), "Sure <tool_call>\n{not json}\n</tool_call>", "Sure <tool_call>\n{not json}\n</tool_call>", []),
    (Hermes(), "I use <tool_call> like <tool_", "I use <tool_call> like <tool_", []),
    (Llama3Json(), "The answer is {1}", "The answer is {1}", []),
    (Llama3Json(), '{"title": "not a call"}', '{"title": "not a call"}', []),
    (Mistral(), "[TOOL_CALLS] oops", "[TOOL_CALLS] oops", []),
    (Harmony(), '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "unit": "C"}'
     "<|call|>", "", [("get_weather", {"city": "Paris", "unit": "C"})]),
    (Harmony(), 'Hm.<|channel|>commentary to=functions.add<|message|>{"a": 1, "b": 2}', "Hm.", [("add", {"a": 1, "b": 2})]),
    (Harmony(), "<|channel|>commentary to=functions.add", "<|channel|>commentary to=functions.add", []),
])
def test_parsers_whole_and_streamed(fmt, text: str, content: str, calls: list[tuple[str, Any]]) -> None:
    whole = parse_all(fmt, text)
    assert whole.content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.calls] == calls
    assert [c.index for c in whole.calls] == list(range(len(calls)))
    assert len({c.id for c in whole.calls}) == len(calls) and all(c.id.startswith("call_") for c in whole.calls)
    stream = ToolStream(fmt)  # one character at a time: no piece of a marker leaks out as content
    sent, deltas = [], []
    for ch in text:
        sent.append(stream.feed(ch))
        deltas.append(stream.take_calls())
    rest = stream.finish()
    assert "".join(sent) + rest.content == content
    assert streamed_calls([d for step in deltas for d in step] + rest.calls) == calls
    if calls:
        assert "<tool" not in "".join(sent) and "[TOOL" not in "".join(sent) and "<|channel|>" not in "".join(sent)
        # each call went out as it was written: its name with its id first, then its arguments in pieces
        assert sum(1 for step in deltas if step) > len(calls) and not rest.calls
        first = next(step for step in deltas if step)[0]
        assert first.id.startswith("call_") and first.function.name == calls[0][0]
        assert first.function.arguments in ("", "{")  # the name went out before its arguments were written
    assert stream.complete == bool(calls)


@pytest.mark.parametrize("fmt, text", [
    (Hermes(), '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b":'),
    (Harmony(), "<|channel|>commentary to=functions.add <|message|>{bad"),
])
def test_a_call_cut_after_its_name_stays_a_call_when_streamed(fmt, text: str) -> None:
    """Streamed, a call goes out as it is written: one that then breaks (max_tokens) cannot be taken back;
    whole, it stays text. Neither finishes with tool_calls."""
    stream = ToolStream(fmt)
    sent = [stream.feed(text[:40]), stream.feed(text[40:])]
    deltas = stream.take_calls()
    rest = stream.finish()
    assert sent == ["", ""] and rest.content == "" and not stream.complete
    assert deltas[0].function.name == "add" and "".join(d.function.arguments for d in deltas + rest.calls) in text
    assert parse_all(fmt, text).content == text and not parse_all(fmt, text).calls


def streamed_calls(deltas) -> list[tuple[str, Any]]:
    """The calls that OpenAI's streamed deltas add up to: the first delta of each index names it (and
    carries its id), the arguments are the concatenation of every delta's."""
    names, arguments = {}, {}
    for d in deltas:
        if d.id is not None:
            assert d.index not in names and d.type == "function"
            names[d.index] = d.function.name
        else:
            assert d.function.name is None and d.index in names
        arguments[d.index] = arguments.get(d.index, "") + (d.function.arguments or "")
    assert sorted(names) == list(range(len(names)))
    return [(names[i], json.loads(arguments[i])) for i in sorted(names)]


def test_parallel_false_keeps_the_first_call() -> None:
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    assert [c.function.name for c in parse_all(Hermes(), text, parallel=False).calls] == ["a"]


# ------------------------------------------------------- special-token markers, scripted pipeline
SPECIALS = ["<|im_start|>", "<|im_end|>", "[TOOL_CALLS]", "<|python_tag|>", "<|channel|>", "<|constrain|>",
            "<|message|>", "<|call|>", "<|start|>", "<|end|>"]
MISTRAL = ("{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}{%- for m in messages %}"
           "{{ m.content }}{% if m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | tojson }}{% endif %}{% endfor %}")
LLAMA31 = ("{%- if tools %}Call a function as {\"name\": ..., \"parameters\": ...}: {{ tools | tojson }}{% endif %}"
           "{%- for m in messages %}{{ m.content }}{% if m.tool_calls %}<|python_tag|>{{ m.tool_calls | tojson }}"
           "{% endif %}{% endfor %}")
SCRIPTED = [  # (template, the model's output, the call it makes)
    (MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}]<|im_end|>',
     ("get_weather", {"city": "Paris", "unit": "C"})),
    (LLAMA31, '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}<|im_end|>', ("add", {"a": 1, "b": 2})),
    (HARMONY, '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris","unit":"F"}'
     "<|call|>", ("get_weather", {"city": "Paris", "unit": "F"})),
]


def special_tokenizer(template: str) -> Any:
    """A byte-level BPE of ~300 tokens whose tool markers are special tokens, as in the real families."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([json.dumps(TOOLS), "What is the weather in Paris?"] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", chat_template=template)


@pytest.mark.parametrize("template, output, call", SCRIPTED)
def test_special_token_markers_reach_the_parser(template: str, output: str, call: tuple[str, Any]) -> None:
    tokenizer = special_tokenizer(template)
    fmt = format_of(template)
    keep = special_ids(fmt, tokenizer)
    ids = tokenizer.encode(output, add_special_tokens=False)
    assert keep & set(ids) and all(tokenizer.added_tokens_decoder[i].special for i in keep)  # special tokens

    def text(kept) -> str:
        detok = IncrementalDetokenizer(tokenizer, [], kept)
        return "".join(detok.add(t) for t in ids) + detok.flush()
    assert not any(marker in text(frozenset()) for marker in fmt.special)  # dropped, as for any other request
    parsed = parse_all(fmt, text(keep))
    assert [(c.function.name, json.loads(c.function.arguments)) for c in parsed.calls] == [call]


@pytest.mark.asyncio
@pytest.mark.parametrize("template, output, call", SCRIPTED)
async def test_scripted_special_token_calls_stream_through_the_gateway(template: str, output: str, call) -> None:
    """The gateway app on a pipeline that replays the output token by token: the streamed deltas add up to
    the call of the complete response, the name first, the arguments in several pieces."""
    from tests.test_gateway_http import FakePipeline

    tokenizer = special_tokenizer(template)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|call|>")]
    app = create_app(FakePipeline(script=tokenizer.encode(output, add_special_tokens=False)), tokenizer, MODEL, 4096, eos)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
        client = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="x", http_client=http, max_retries=0)
        whole = (await client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)).choices[0]
        assert whole.finish_reason == "tool_calls" and not whole.message.content
        assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls] == [call]
        deltas, content, finish = [], "", None
        async for chunk in await client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, stream=True):
            for choice in chunk.choices:
                deltas.append(choice.delta.tool_calls or [])
                content += choice.delta.content or ""
                finish = choice.finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert streamed_calls([d for chunk in deltas for d in chunk]) == [call]
    with_calls = [i for i, chunk in enumerate(deltas) if chunk]
    assert len(with_calls) > 2 and deltas[with_calls[0]][0].function.name == call[0]


# ----------------------------------------------------------------------------- real cluster
@pytest.fixture(scope="module")
def hermes_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The tiny model's weights with a Hermes-style chat template."""
    folder = tmp_path_factory.mktemp("tiny-hermes")
    for name in os.listdir(tiny_model_dir):
        if not name.startswith(("tokenizer", "chat_template", "special_tokens")):
            (folder / name).symlink_to(tiny_model_dir / name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = HERMES
    tokenizer.save_pretrained(folder)
    return folder


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def oai(hermes_dir: Path, tiny_model_dir: Path) -> AsyncIterator[tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]]:
    """Clients of two gateways on one cluster: the Hermes template, and SmolLM2's (which takes no tools)."""
    server = start_nats_server()
    try:
        async with cluster(server.url, hermes_dir, MODEL, LAYERS, [(0, LAYERS)]) as c:
            eos = eos_token_ids(hermes_dir)
            apps = [create_app(c.pipeline, AutoTokenizer.from_pretrained(d), MODEL, 4096, eos)
                    for d in (hermes_dir, tiny_model_dir)]
            https = [httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://gateway") for a in apps]
            yield tuple(openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="x", http_client=h, max_retries=0)
                        for h in https)
            for h in https:
                await h.aclose()
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_named_tool_call_round_trip(oai) -> None:
    client, _ = oai
    first = await client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=80, temperature=0.0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    # feed the call and its result back: the template renders both into the next prompt
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    second = await client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=4,
                                                  temperature=0.0)
    assert second.choices[0].finish_reason in ("stop", "length") and not second.choices[0].message.tool_calls
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 20  # the call and its result are in the prompt
    without = await client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=1,
                                                   tool_choice="none")
    assert without.usage.prompt_tokens < second.usage.prompt_tokens - 100  # none: the tools stay out of the prompt


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_required_tool_call_streams_deltas(oai) -> None:
    client, _ = oai
    deltas, finish, content = [], None, ""
    async for chunk in await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Add two numbers."}], tools=TOOLS, max_tokens=80,
            temperature=0.8, seed=5, tool_choice="required", stream=True):
        delta = chunk.choices[0].delta
        deltas += delta.tool_calls or []
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert {d.index for d in deltas} == {0} and deltas[0].id.startswith("call_")
    assert len(deltas) > 2  # the name, then the arguments in pieces as the model wrote them
    ((name, arguments),) = streamed_calls(deltas)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate(arguments, schemas[name])


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_auto_tool_choice_leaves_plain_text_as_content(oai) -> None:
    """A random model writes no <tool_call>: auto gives its text as content, finish stop/length."""
    client, _ = oai
    out = await client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=6, temperature=0.0)
    assert out.choices[0].finish_reason in ("stop", "length") and out.choices[0].message.tool_calls is None


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("body, word", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
])
async def test_bad_tool_requests_are_400(oai, body: dict[str, Any], word: str) -> None:
    client, _ = oai
    with pytest.raises(openai.BadRequestError, match=word):
        await client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, extra_body=body)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_template_without_tools_is_400(oai) -> None:
    _, plain = oai
    with pytest.raises(openai.BadRequestError, match="does not take tools"):
        await plain.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=4)


@pytest.mark.slow
def test_calls_and_results_are_fed_to_the_template(hermes_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(hermes_dir)
    messages = [ChatMessage.model_validate(m) for m in ASK + [
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]]
    text = tokenizer.decode(encode_chat(tokenizer, messages, TOOLS))
    assert '"name": "get_weather"' in text and '{"city": "Paris"}' in text  # arguments as an object, not a string
    assert "<tool_response>\n21 C\n</tool_response>" in text and '"description": "Weather in a city"' in text
