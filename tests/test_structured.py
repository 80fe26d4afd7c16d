"""Structured outputs through the official openai client against a real cluster: the gateway app (in
process, httpx ASGI transport) over a real nats-server and one in-process stage serving a random tiny
Llama with SmolLM2's tokenizer. A random model never writes JSON by itself: whatever validates here
was made valid by the last stage's token mask (xgrammar)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import pytest_asyncio
from transformers import AutoTokenizer

from parallax.broker.errors import GrammarError
from parallax.broker.model import eos_token_ids
from parallax.broker.wire import Grammar, SamplingParams
from parallax.gateway.app import create_app
from parallax.stages.grammar import Grammars

from .cluster import cluster
from .conftest import start_nats_server

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]  # SmolLM2's tokenizer
MODEL, LAYERS = "tiny", 6


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def oai(tiny_model_dir: Path) -> AsyncIterator[openai.AsyncOpenAI]:
    server = start_nats_server()
    try:
        async with cluster(server.url, tiny_model_dir, MODEL, LAYERS, [(0, LAYERS)]) as c:
            tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
            app = create_app(c.pipeline, tokenizer, MODEL, 4096, eos_token_ids(tiny_model_dir))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
                yield openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="x", http_client=http, max_retries=0)
    finally:
        server.stop()


def _s(max_length: int = 8) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length}


def _int(low: int = 0, high: int = 99) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high}


def _obj(required: bool = True, **props: Any) -> dict[str, Any]:
    schema = {"type": "object", "properties": props, "additionalProperties": False}
    return schema | ({"required": list(props)} if required else {})


# 20 schemas with bounded output (strings have a maxLength, numbers bounds): a random model must finish them
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("Give a person.", _obj(name=_s(), age=_int(0, 120))),
    ("Is it raining?", _obj(answer={"type": "boolean"})),
    ("Pick a color.", _obj(color={"enum": ["red", "green", "blue"]})),
    ("List up to three tags.", _obj(tags={"type": "array", "items": _s(5), "maxItems": 3})),
    ("A point.", _obj(x=_int(-50, 50), y=_int(-50, 50))),
    ("A city and its country.", _obj(city=_s(10), country=_s(6))),
    ("Nothing at all.", _obj(value={"type": "null"})),
    ("A nested address.", _obj(address=_obj(street=_s(6), number=_int(1, 999)))),
    ("A constant.", _obj(kind={"const": "fixed"}, n=_int(0, 9))),
    ("Some scores.", _obj(scores={"type": "array", "items": _int(0, 10), "minItems": 1, "maxItems": 4})),
    ("An id and a flag.", _obj(id=_int(1000, 9999), ok={"type": "boolean"})),
    ("Optional fields.", _obj(False, a=_s(4), b=_int(0, 5))),
    ("A choice of shape.", {"anyOf": [_obj(circle=_int(1, 9)), _obj(square=_s(3))]}),
    ("Just a number.", _int(0, 999)),
    ("Just a word.", _s(6)),
    ("A pair of enums.", _obj(size={"enum": ["S", "M", "L"]}, fit={"enum": ["slim", "loose"]})),
    ("A matrix row.", {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2}),
    ("A book.", _obj(title=_s(12), year=_int(1900, 2025), tags={"type": "array", "items": _s(3), "maxItems": 2})),
    ("Weather.", _obj(temp=_int(-30, 45), sky={"enum": ["clear", "cloudy"]}, wind=_obj(kph=_int(0, 99)))),
    ("A short code.", _obj(code={"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"})),
]


def _chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def _json_schema(oai: openai.AsyncOpenAI, prompt: str, schema: dict[str, Any], stream: bool) -> tuple[str, str]:
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    if not stream:
        out = await oai.chat.completions.create(model=MODEL, messages=_chat(prompt), response_format=fmt,
                                                max_tokens=120, temperature=0.0)
        return out.choices[0].message.content or "", out.choices[0].finish_reason
    text, finish = "", ""
    async for chunk in await oai.chat.completions.create(model=MODEL, messages=_chat(prompt), response_format=fmt,
                                                         max_tokens=120, temperature=0.0, stream=True):
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


async def test_json_schema_outputs_validate(oai: openai.AsyncOpenAI) -> None:
    """20 schemas at once (one batch), every other one streamed: each output parses and validates,
    and ends because its grammar is complete."""
    results = await asyncio.gather(*(_json_schema(oai, p, s, k % 2 == 1) for k, (p, s) in enumerate(SCHEMAS)))
    for (prompt, schema), (text, finish) in zip(SCHEMAS, results):
        assert finish == "stop", (prompt, text)
        jsonschema.validate(json.loads(text), schema)


async def test_free_rows_are_untouched_by_constrained_rows(oai: openai.AsyncOpenAI) -> None:
    """An unconstrained request gives the same greedy text alone and in a batch with constrained ones."""
    async def free() -> str:
        out = await oai.completions.create(model=MODEL, prompt="The weather today", max_tokens=12, temperature=0.0)
        return out.choices[0].text

    alone = await free()
    together = await asyncio.gather(free(), *(_json_schema(oai, p, s, False) for p, s in SCHEMAS[:3]))
    assert together[0] == alone
    assert not alone.lstrip().startswith("{")  # the mask did not leak into the free row


async def test_guided_choice_and_regex(oai: openai.AsyncOpenAI) -> None:
    choices = ["positive", "negative", "neutral ✓"]
    out = await oai.chat.completions.create(model=MODEL, messages=_chat("Sentiment?"), temperature=0.0,
                                            extra_body={"guided_choice": choices})
    assert out.choices[0].message.content in choices and out.choices[0].finish_reason == "stop"
    regex = r"[a-z]{3}-[0-9]{2}"
    out = await oai.completions.create(model=MODEL, prompt="A code:", max_tokens=20, temperature=0.7, seed=3,
                                       extra_body={"structured_outputs": {"regex": regex}})
    assert re.fullmatch(regex, out.choices[0].text), out.choices[0].text
    out = await oai.completions.create(model=MODEL, prompt="Colour:", max_tokens=20, temperature=1.0, seed=1,
                                       extra_body={"guided_grammar": 'root ::= "red" | "green" | "blue"'})
    assert out.choices[0].text in ("red", "green", "blue")


async def test_json_object_is_a_json_object_prefix(oai: openai.AsyncOpenAI) -> None:
    """``json_object``: any object; a random model may not close it within max_tokens, but every token it
    wrote keeps the text a prefix of a JSON object (``jsonschema`` checks whole ones elsewhere)."""
    out = await oai.chat.completions.create(model=MODEL, messages=_chat("JSON please"), max_tokens=8,
                                            response_format={"type": "json_object"}, temperature=0.0)
    text = out.choices[0].message.content or ""
    assert text.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("body, word", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "nonsense"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
    ({"guided_regex": "([a-z"}, "regex"),
    ({"guided_json": "{not json"}, "json schema"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "only one"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "only one"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "one of"),
    ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens"),
])
async def test_bad_structured_requests_are_400(oai: openai.AsyncOpenAI, body: dict[str, Any], word: str) -> None:
    with pytest.raises(openai.BadRequestError, match=re.escape(word)):
        await oai.chat.completions.create(model=MODEL, messages=_chat("x"), max_tokens=4, extra_body=body)


async def test_text_format_is_free_text() -> None:
    from parallax.gateway.protocol import ChatCompletionRequest

    body = ChatCompletionRequest(messages=_chat("x"), response_format={"type": "text"})
    assert body.grammar() is None


async def test_resumed_request_replays_its_tokens(tiny_model_dir: Path) -> None:
    """A resubmission carries ``replay`` = tokens so far; a fresh matcher over them allows what the
    first one allowed at that point, and a token the grammar forbids is refused."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tuple(eos_token_ids(tiny_model_dir))
    grammars = Grammars(tiny_model_dir, len(tokenizer))
    params = SamplingParams(max_tokens=20, stop_token_ids=eos,
                            grammar=Grammar(kind="json_schema", spec=json.dumps(_obj(n=_int(0, 99)))))
    text = tokenizer.encode('{"n": 42}')
    first = grammars.constraint(params)
    for token in text[:3]:
        first.accept(token)
    rest = params.rest(3)
    assert rest.grammar is not None and rest.grammar.replay == 3 and rest.rest(0).grammar.replay == 3
    resumed = grammars.constraint(rest, text[:3])
    assert bool((resumed.allowed == first.allowed).all()) and not resumed.complete
    for token in text[3:]:
        resumed.accept(token)
    assert resumed.complete  # `}` closed the object: nothing but a stop token may follow
    with pytest.raises(GrammarError):
        grammars.constraint(params, tokenizer.encode("[1]"))
