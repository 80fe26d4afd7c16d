"""The gateway's OpenAI-compatible HTTP layer, against a scripted fake pipeline.

``FakePipeline`` stands in for the NATS cluster only here, to test the HTTP layer in isolation
(request validation, SSE format, stop strings, error mapping, releasing requests). The real
end-to-end tests over NATS live elsewhere.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from transformers import PreTrainedTokenizerBase

from parallax.broker.errors import ChainUnavailable, StageFailed
from parallax.broker.wire import SamplingParams, TokenOut
from parallax.gateway.app import create_app

pytestmark = pytest.mark.slow  # every test here uses the SmolLM2 tokenizer: needs the SmolLM2 conversion
MODEL = "smollm2-135m"
MAX_CONTEXT = 512
TEXT = "Hello world! I am SmolLM, a tiny model. 日本語 🎉 works too. The end."
CHAT = [{"role": "user", "content": "Introduce yourself."}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer) -> PreTrainedTokenizerBase:
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def eos(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert isinstance(eos, int)
    return eos


# ------------------------------------------------------------------------------- fake pipeline
@dataclass
class Call:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class FakePipeline:
    """Replays ``script`` for every request; optionally raises ``error`` before token ``error_at``."""

    script: list[int]
    missing_ranges: list[tuple[int, int]] = field(default_factory=list)
    error: Exception | None = None
    error_at: int = 0
    delay: float = 0.0
    calls: list[Call] = field(default_factory=list)
    ended: dict[str, str] = field(default_factory=dict)  # rid -> finished | closed | cancelled | raised
    sent: dict[str, int] = field(default_factory=dict)  # rid -> tokens yielded

    def missing(self) -> list[tuple[int, int]]:
        return list(self.missing_ranges)

    async def generate(
        self, rid: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenOut]:
        self.calls.append(Call(rid, list(prompt_ids), params))
        self.sent[rid] = 0
        how = "raised"
        try:
            for index, token in enumerate(self.script):
                if self.error is not None and index == self.error_at:
                    raise self.error
                finish = self._finish(index, token, params)
                how = "finished" if finish else "closed"
                self.sent[rid] += 1
                yield TokenOut(rid=rid, token=token, index=index, finish=finish)
                if finish:
                    return
                await asyncio.sleep(self.delay)
            how = "finished"
        except asyncio.CancelledError:
            how = "cancelled"
            raise
        finally:
            self.ended[rid] = how

    def _finish(self, index: int, token: int, params: SamplingParams) -> str | None:
        if index + 1 >= params.max_tokens:
            return "length"
        if index + 1 == len(self.script) or (token in params.stop_token_ids and not params.ignore_eos):
            return "stop"
        return None


Serve = Callable[..., tuple[FakePipeline, httpx.AsyncClient]]


@pytest.fixture
async def serve(tokenizer: PreTrainedTokenizerBase, eos: int) -> AsyncIterator[Serve]:
    clients: list[httpx.AsyncClient] = []

    def make(
        script: list[int] | None = None, max_context: int = MAX_CONTEXT, **fake: Any
    ) -> tuple[FakePipeline, httpx.AsyncClient]:
        pipeline = FakePipeline(script if script is not None else tokenizer.encode(TEXT) + [eos], **fake)
        app = create_app(pipeline, tokenizer, MODEL, max_context, [eos])
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
        clients.append(client)
        return pipeline, client

    yield make
    for client in clients:
        await client.aclose()


def events(response: httpx.Response) -> list[str]:
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in response.text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks)
    return [b.removeprefix("data: ") for b in blocks]


def chunks(response: httpx.Response) -> list[dict[str, Any]]:
    data = events(response)
    assert data[-1] == "[DONE]"
    assert "[DONE]" not in data[:-1]
    return [json.loads(d) for d in data[:-1]]


def chat_text(parsed: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in parsed if c["choices"])


def assert_error(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    for word in words:
        assert word in error["message"]
    return error


# --------------------------------------------------------------------------------- basic routes
async def test_models(serve: Serve) -> None:
    _, client = serve()
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["object"] == "model"


async def test_health_ok(serve: Serve) -> None:
    _, client = serve()
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_health_names_missing_ranges(serve: Serve) -> None:
    _, client = serve(missing_ranges=[(12, 24), (28, 30)])
    error = assert_error(await client.get("/health"), 503, "12:24", "28:30")
    assert error["code"] == "chain_unavailable"


async def test_unknown_route_is_error_json(serve: Serve) -> None:
    _, client = serve()
    assert_error(await client.get("/v1/nothing"), 404)


# ----------------------------------------------------------------------------- chat completions
async def test_chat_completion(serve: Serve, tokenizer: PreTrainedTokenizerBase, eos: int) -> None:
    fake, client = serve()
    response = await client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "user": "u1"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": TEXT}
    assert choice["finish_reason"] == "stop"
    [call] = fake.calls
    template = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert call.prompt_ids == tokenizer.encode(template, add_special_tokens=False)
    assert (
        call.prompt_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") != call.prompt_ids[1]
    )  # one BOS
    assert call.params.stop_token_ids == (eos,)
    assert call.params.max_tokens == MAX_CONTEXT - len(call.prompt_ids)  # vLLM default
    assert body["usage"] == {
        "prompt_tokens": len(call.prompt_ids),
        "completion_tokens": len(fake.script),
        "total_tokens": len(call.prompt_ids) + len(fake.script),
    }
    assert fake.ended == {call.rid: "finished"}


async def test_chat_content_parts(serve: Serve, tokenizer: PreTrainedTokenizerBase) -> None:
    fake, client = serve()
    parts = [{"type": "text", "text": "Introduce"}, {"type": "text", "text": "yourself."}]
    response = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}]}
    )
    assert response.status_code == 200, response.text
    prompt = tokenizer.decode(fake.calls[0].prompt_ids)
    assert "Introduce\nyourself." in prompt


async def test_chat_stream(serve: Serve) -> None:
    fake, client = serve()
    response = await client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "stream": True}
    )
    assert response.status_code == 200
    parsed = chunks(response)
    assert {c["object"] for c in parsed} == {"chat.completion.chunk"}
    assert len({c["id"] for c in parsed}) == 1
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"][0]["finish_reason"] is None for c in parsed[:-1])
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"
    assert chat_text(parsed) == TEXT
    assert all("usage" not in c for c in parsed)
    assert all("\ufffd" not in (c["choices"][0]["delta"].get("content") or "") for c in parsed)


async def test_chat_stream_usage_chunk(serve: Serve) -> None:
    fake, client = serve()
    body = {"messages": CHAT, "stream": True, "stream_options": {"include_usage": True}}
    parsed = chunks(await client.post("/v1/chat/completions", json=body))
    usage_chunk = parsed[-1]
    assert usage_chunk["choices"] == []
    prompt_len = len(fake.calls[0].prompt_ids)
    assert usage_chunk["usage"] == {
        "prompt_tokens": prompt_len,
        "completion_tokens": len(fake.script),
        "total_tokens": prompt_len + len(fake.script),
    }
    assert parsed[-2]["choices"][0]["finish_reason"] == "stop"


async def test_max_tokens_gives_length(serve: Serve, tokenizer: PreTrainedTokenizerBase) -> None:
    fake, client = serve()
    response = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3})
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == tokenizer.decode(fake.script[:3])
    assert body["usage"]["completion_tokens"] == 3
    assert fake.calls[0].params.max_tokens == 3


async def test_max_completion_tokens_wins(serve: Serve) -> None:
    fake, client = serve()
    body = {"messages": CHAT, "max_tokens": 50, "max_completion_tokens": 2, "stream": True}
    parsed = chunks(await client.post("/v1/chat/completions", json=body))
    assert parsed[-1]["choices"][0]["finish_reason"] == "length"
    assert fake.calls[0].params.max_tokens == 2


@pytest.mark.parametrize("last", [1, 5], ids=["before-max_tokens", "after-max_tokens"])
async def test_the_pipeline_decides_length(serve: Serve, tokenizer: PreTrainedTokenizerBase, last: int) -> None:
    """The last stage ends a request (it counts tokens and knows the context); the gateway passes on
    its finish and never counts to max_tokens itself."""
    fake, client = serve()
    fake._finish = lambda index, token, params: "length" if index == last else None  # type: ignore[method-assign]
    body = (await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})).json()
    assert fake.calls[0].params.max_tokens == 4
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"] == tokenizer.decode(fake.script[: last + 1])
    assert body["usage"]["completion_tokens"] == last + 1
    assert fake.ended[fake.calls[0].rid] == "finished"


async def test_sampling_params_are_passed_through(serve: Serve, eos: int) -> None:
    fake, client = serve()
    body = {
        "messages": CHAT,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 1234,
        "max_tokens": 20,
        "top_k": 40,
        "min_tokens": 5,
        "ignore_eos": True,
        "repetition_penalty": 1.1,
        "logprobs": False,
        "presence_penalty": 0.0,
    }
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    params = fake.calls[0].params
    assert params == SamplingParams(
        temperature=0.7,
        top_p=0.9,
        seed=1234,
        max_tokens=20,
        top_k=40,
        min_tokens=5,
        ignore_eos=True,
        repetition_penalty=1.1,
        stop_token_ids=(eos,),
    )


async def test_default_sampling_params(serve: Serve) -> None:
    fake, client = serve()
    assert (await client.post("/v1/chat/completions", json={"messages": CHAT})).status_code == 200
    params = fake.calls[0].params
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (1.0, 1.0, -1, None)
    assert (params.min_tokens, params.ignore_eos, params.repetition_penalty) == (0, False, 1.0)


# ---------------------------------------------------------------------------------- completions
async def test_completion_with_text_prompt(serve: Serve, tokenizer: PreTrainedTokenizerBase) -> None:
    fake, client = serve()
    response = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200}
    )
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == TEXT
    assert body["choices"][0]["finish_reason"] == "stop"
    assert fake.calls[0].prompt_ids == tokenizer.encode("Once upon a time")
    assert body["usage"]["prompt_tokens"] == len(fake.calls[0].prompt_ids)


@pytest.mark.parametrize("prompt", [[9, 8, 7], [[9, 8, 7]]])
async def test_completion_with_token_ids(serve: Serve, prompt: list[Any]) -> None:
    fake, client = serve()
    response = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5})
    assert response.status_code == 200, response.text
    assert fake.calls[0].prompt_ids == [9, 8, 7]


async def test_completion_stream(serve: Serve) -> None:
    fake, client = serve()
    body = {"prompt": "Hi", "stream": True, "stream_options": {"include_usage": True}}
    parsed = chunks(await client.post("/v1/completions", json=body))
    assert {c["object"] for c in parsed} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in parsed if c["choices"]) == TEXT
    assert parsed[-2]["choices"][0]["finish_reason"] == "stop"
    assert parsed[-1]["choices"] == []
    assert parsed[-1]["usage"]["completion_tokens"] == len(fake.script)


# --------------------------------------------------------------------------------- stop strings
def test_stop_string_spans_two_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode(TEXT)
    pieces = [tokenizer.decode([t]) for t in ids]
    assert "lo wo" in TEXT and not any("lo wo" in p for p in pieces)  # "Hello" | " world"


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ("lo wo", "Hel"),
        (["xyz", "SmolLM"], "Hello world! I am "),
        ("🎉", "Hello world! I am SmolLM, a tiny model. 日本語 "),
    ],
)
async def test_stop_string_not_in_output(serve: Serve, stop: str | list[str], expected: str) -> None:
    fake, client = serve()
    body = (await client.post("/v1/chat/completions", json={"messages": CHAT, "stop": stop})).json()
    assert body["choices"][0]["message"]["content"] == expected
    assert body["choices"][0]["finish_reason"] == "stop"
    rid = fake.calls[0].rid
    assert fake.ended[rid] == "closed"  # released early with aclose()
    assert fake.sent[rid] < len(fake.script)
    assert body["usage"]["completion_tokens"] == fake.sent[rid]


@pytest.mark.parametrize("stop", ["lo wo", "tiny model", "日本"])
async def test_stop_string_not_in_stream(serve: Serve, stop: str) -> None:
    fake, client = serve()
    parsed = chunks(
        await client.post("/v1/chat/completions", json={"messages": CHAT, "stop": [stop], "stream": True})
    )
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in parsed]
    text = "".join(pieces)
    assert text == TEXT[: TEXT.index(stop)]
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"
    assert fake.ended[fake.calls[0].rid] == "closed"


async def test_partial_stop_prefix_is_released(serve: Serve) -> None:
    _, client = serve()
    body = {"prompt": "x", "stop": "world!!", "stream": True}
    parsed = chunks(await client.post("/v1/completions", json=body))
    assert "".join(c["choices"][0]["text"] for c in parsed) == TEXT


async def test_stop_strings_wait_for_min_tokens(serve: Serve) -> None:
    _, client = serve()
    body = {"prompt": "x", "stop": ["lo wo", "model"], "min_tokens": 4}  # "lo wo" ends at token 2
    text = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
    assert text == TEXT[: TEXT.index("model")]


async def test_completion_stop_string(serve: Serve) -> None:
    _, client = serve()
    body = (await client.post("/v1/completions", json={"prompt": "x", "stop": "!"})).json()
    assert body["choices"][0]["text"] == "Hello world"


# ------------------------------------------------------------------------------------ bad input
BAD_CHAT: list[tuple[dict[str, Any], int, str]] = [
    ({"model": "gpt-4", "messages": CHAT}, 404, "gpt-4"),
    ({"messages": []}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": CHAT, "n": 0}, 400, "n"),
    ({"messages": CHAT, "n": 65}, 400, "64"),
    ({"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": CHAT, "max_tokens": -5}, 400, "max_tokens"),
    ({"messages": CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ({"messages": CHAT, "temperature": -0.5}, 400, "temperature"),
    ({"messages": CHAT, "top_p": 0}, 400, "top_p"),
    ({"messages": CHAT, "top_p": 1.5}, 400, "top_p"),
    ({"messages": CHAT, "top_k": -2}, 400, "top_k"),
    ({"messages": CHAT, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"messages": CHAT, "max_tokens": MAX_CONTEXT}, 400, str(MAX_CONTEXT)),
    ({"messages": CHAT, "max_tokens": 5, "min_tokens": 6}, 400, "min_tokens"),
    ({"messages": CHAT, "top_logprobs": 2}, 400, "logprobs: true"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"messages": CHAT, "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ({"messages": CHAT, "presence_penalty": -3}, 400, "presence_penalty"),
    ({"messages": CHAT, "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"messages": CHAT, "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"messages": CHAT, "logit_bias": {str(10**9): 1}}, 400, "vocabulary"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "does not take tools"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages",
    ),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": CHAT, "stop": 5}, 400, "stop"),
]


@pytest.mark.parametrize(("body", "status", "word"), BAD_CHAT)
@pytest.mark.parametrize("stream", [False, True])
async def test_bad_chat_requests(
    serve: Serve, body: dict[str, Any], status: int, word: str, stream: bool
) -> None:
    fake, client = serve()
    response = await client.post("/v1/chat/completions", json={**body, "stream": stream})
    error = assert_error(response, status, word)
    assert fake.calls == []
    if status == 404:
        assert error["code"] == "model_not_found"
        assert error["type"] == "NotFoundError"


BAD_COMPLETIONS: list[tuple[dict[str, Any], int, str]] = [
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": []}, 400, "empty"),
    ({"prompt": [[]]}, 400, "empty"),
    ({"prompt": ["a", "b"]}, 400, "one prompt"),
    ({"prompt": [[1, 2], [3]]}, 400, "one prompt"),
    ({"prompt": [1, -2]}, 400, "prompt"),
    ({"prompt": [1, 10**9]}, 400, "vocabulary"),
    ({"prompt": "hi", "n": 65}, 400, "64"),
    ({"prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "hi", "best_of": 2}, 400, "best_of"),
    ({"prompt": "hi", "n": 2, "best_of": 1}, 400, "best_of"),
    ({"prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ({"prompt": "hi", "model": "other"}, 404, "other"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": list(range(MAX_CONTEXT + 10))}, 400, f"{MAX_CONTEXT + 10} tokens"),
    ({"prompt": list(range(MAX_CONTEXT))}, 400, str(MAX_CONTEXT)),
    ({"prompt": list(range(500)), "max_tokens": 20}, 400, "520"),
    ({"max_tokens": 5}, 400, "prompt"),
]


@pytest.mark.parametrize(("body", "status", "word"), BAD_COMPLETIONS)
async def test_bad_completion_requests(serve: Serve, body: dict[str, Any], status: int, word: str) -> None:
    fake, client = serve()
    assert_error(await client.post("/v1/completions", json=body), status, word)
    assert fake.calls == []


async def test_prompt_exactly_fills_context_with_max_tokens(serve: Serve) -> None:
    fake, client = serve()
    response = await client.post(
        "/v1/completions", json={"prompt": list(range(500)), "max_tokens": MAX_CONTEXT - 500}
    )
    assert response.status_code == 200, response.text
    assert fake.calls[0].params.max_tokens == 12


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'{"messages": [}'])
async def test_malformed_json(serve: Serve, raw: bytes) -> None:
    fake, client = serve()
    response = await client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert_error(response, 400)
    assert fake.calls == []


# ----------------------------------------------------------------------------- pipeline errors
@pytest.mark.parametrize("stream", [False, True])
async def test_chain_unavailable_is_503(serve: Serve, stream: bool) -> None:
    fake, client = serve(error=ChainUnavailable(MODEL, [(10, 20)]))
    response = await client.post("/v1/chat/completions", json={"messages": CHAT, "stream": stream})
    error = assert_error(response, 503, "10:20")
    assert error["code"] == "chain_unavailable"
    assert fake.ended[fake.calls[0].rid] == "raised"


@pytest.mark.parametrize("stream", [False, True])
async def test_stage_failed_before_first_token(serve: Serve, stream: bool) -> None:
    _, client = serve(error=StageFailed("stage node-2 vanished"))
    response = await client.post("/v1/completions", json={"prompt": "hi", "stream": stream})
    error = assert_error(response, 502, "node-2 vanished")
    assert error["code"] == "stage_failed"


async def test_stage_failed_mid_stream(serve: Serve, tokenizer: PreTrainedTokenizerBase) -> None:
    fake, client = serve(error=StageFailed("stage node-2 vanished"), error_at=4)
    response = await client.post("/v1/chat/completions", json={"messages": CHAT, "stream": True})
    assert response.status_code == 200
    data = events(response)
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert "node-2 vanished" in error["message"] and error["code"] == "stage_failed"
    parsed = [json.loads(d) for d in data[:-2]]
    assert chat_text(parsed) == tokenizer.decode(fake.script[:4])
    assert all(c["choices"][0]["finish_reason"] is None for c in parsed)


async def test_stage_failed_mid_request_without_stream(serve: Serve) -> None:
    _, client = serve(error=StageFailed("stage node-2 vanished"), error_at=4)
    response = await client.post("/v1/chat/completions", json={"messages": CHAT})
    assert_error(response, 502, "node-2 vanished")


@pytest.mark.parametrize("stream", [False, True])
async def test_unexpected_error_is_500_without_traceback(
    serve: Serve, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    _, client = serve(error=RuntimeError("secret internals"), error_at=0)
    response = await client.post("/v1/completions", json={"prompt": "hi", "stream": stream})
    error = assert_error(response, 500)
    assert "secret internals" not in error["message"]
    assert "secret internals" in caplog.text  # logged server-side


async def test_unexpected_error_mid_stream(serve: Serve) -> None:
    _, client = serve(error=RuntimeError("boom"), error_at=2)
    data = events(await client.post("/v1/completions", json={"prompt": "hi", "stream": True}))
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["code"] == "internal_error"


# ---------------------------------------------------------------------------- client disconnect
@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_client_disconnect_releases_request(
    tokenizer: PreTrainedTokenizerBase, eos: int, spec_version: str
) -> None:
    """A streaming client that goes away must close the pipeline iterator (raw ASGI, both paths)."""
    fake = FakePipeline(tokenizer.encode(TEXT * 50), delay=0.001)
    app = create_app(fake, tokenizer, MODEL, 4096, [eos])
    body = json.dumps({"prompt": "hi", "stream": True, "max_tokens": 3000}).encode()
    sent: list[bytes] = []
    gone = asyncio.Event()
    request_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] != "http.response.body":
            return
        if gone.is_set():
            if spec_version == "2.3":
                return  # like uvicorn: sends after a disconnect are dropped, the app learns from receive()
            raise OSError("connection closed")  # ASGI >= 2.4: send raises once the client is gone
        sent.append(message["body"])
        if len(sent) >= 3:
            gone.set()

    await asyncio.wait_for(_call(app, spec_version, receive, send), timeout=10)
    rid = fake.calls[0].rid
    assert fake.ended[rid] == "closed"  # closed with aclose(), never cancelled mid-await
    assert fake.sent[rid] < 100


def _call(
    app: FastAPI,
    spec_version: str,
    receive: Callable[[], Awaitable[Any]],
    send: Callable[[Any], Awaitable[None]],
) -> Awaitable[None]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"gateway")],
        "client": ("127.0.0.1", 5000),
        "server": ("gateway", 80),
    }
    return app(scope, receive, send)


async def test_client_disconnect_over_real_http(tokenizer: PreTrainedTokenizerBase, eos: int) -> None:
    """Same, through a real uvicorn server and socket: closing the response releases the request."""
    fake = FakePipeline(tokenizer.encode(TEXT * 50), delay=0.002)
    server = uvicorn.Server(
        uvicorn.Config(create_app(fake, tokenizer, MODEL, 4096, [eos]), port=0, log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        body = {"messages": CHAT, "stream": True, "max_tokens": 3000}
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
            client.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            lines = [line async for line in _first_lines(response, 3)]
        assert all(line.startswith("data: {") for line in lines)
        rid = fake.calls[0].rid
        for _ in range(500):
            if rid in fake.ended:
                break
            await asyncio.sleep(0.01)
        assert fake.ended.get(rid) == "closed"
        assert fake.sent[rid] < 500
    finally:
        server.should_exit = True
        await serving


async def _first_lines(response: httpx.Response, n: int) -> AsyncIterator[str]:
    count = 0
    async for line in response.aiter_lines():
        if line:
            yield line
            count += 1
            if count == n:
                return


# --------------------------------------------------------------------------- official client
async def test_openai_client_streams_chat(serve: Serve) -> None:
    fake, client = serve()
    oai = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="x", http_client=client)  # type: ignore[arg-type]
    stream = await oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Introduce yourself."}],
        stream=True,
        stream_options={"include_usage": True},
        stop=["tiny"],
        temperature=0.0,
        extra_body={"top_k": 5},
    )
    text, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert text == TEXT[: TEXT.index("tiny")]
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == fake.sent[fake.calls[0].rid]
    assert fake.calls[0].params.top_k == 5 and fake.calls[0].params.temperature == 0.0


async def test_openai_client_completion_and_errors(serve: Serve) -> None:
    _, client = serve()
    oai = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="x", http_client=client, max_retries=0)  # type: ignore[arg-type]
    completion = await oai.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    models = await oai.models.list()
    assert [m.id for m in models.data] == [MODEL]
    with pytest.raises(openai.NotFoundError):
        await oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="best_of"):
        await oai.completions.create(model=MODEL, prompt="x", n=2, best_of=3)
