"""How each endpoint shapes a request's deltas: streamed chunks (SSE) and the complete response,
logprobs included (chat's ``content`` entries, text completions' legacy lists)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send
from tokenizers.decoders import ByteLevel
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .generation import Delta, Generation, Job, TokenLogprob, close_all, merged
from .http_errors import api_error
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    DeltaMessage,
    FinishReason,
    PromptLogprob,
    TokenLogprob as ChatTokenLogprob,
    TopLogprob,
    Usage,
)
from .tools import ToolFormat, ToolStream, parse_all

_DONE = "data: [DONE]\n\n"
_REPLACEMENT = "\ufffd"


class TokenNames:
    """A token id as logprobs name it: its text and its UTF-8 bytes. A token that holds part of a
    character (byte-level BPE) is named by its bytes, ``bytes:\\xe6\\x97``, like OpenAI does."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        fast = isinstance(tokenizer, PreTrainedTokenizerFast)
        self._byte_level = fast and isinstance(tokenizer.backend_tokenizer.decoder, ByteLevel)
        self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        self._added = frozenset(tokenizer.added_tokens_decoder)
        self._names: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        name = self._names.get(token)
        if name is None:
            name = self._names[token] = self._name(token)
        return name

    def text(self, token: int) -> str:
        return self(token)[0]

    def _name(self, token: int) -> tuple[str, list[int]]:
        text = str(self._tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        raw = self._raw_bytes(token) or text.encode()
        if _REPLACEMENT in text and raw != text.encode():
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, list(raw)

    def _raw_bytes(self, token: int) -> bytes | None:
        """A byte-level BPE token's own bytes (its decoded text may have lost some); None elsewhere."""
        if not self._byte_level or token in self._added:
            return None
        piece = self._tokenizer.convert_ids_to_tokens(token)
        if not isinstance(piece, str) or any(char not in self._byte_of for char in piece):
            return None
        return bytes(self._byte_of[char] for char in piece)


def chat_logprobs(names: TokenNames, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    def top(token: int, logprob: float) -> TopLogprob:
        text, raw = names(token)
        return TopLogprob(token=text, logprob=logprob, bytes=raw)

    content = [ChatTokenLogprob(**top(e.token, e.logprob).model_dump(), top_logprobs=[top(t, lp) for t, lp in e.top])
               for e in entries]
    return ChatLogprobs(content=content)


def completion_logprobs(names: TokenNames, entries: Sequence[TokenLogprob], k: int) -> CompletionLogprobs:
    """OpenAI's legacy lists; each ``top_logprobs`` entry holds the ``k`` most likely tokens and the sampled one."""
    tops: list[dict[str, float] | None] = []
    for e in entries:
        top = {names.text(t): lp for t, lp in e.top[:k]}
        if e.logprob is not None:
            top.setdefault(names.text(e.token), e.logprob)
        tops.append(top if e.logprob is not None else None)
    return CompletionLogprobs(tokens=[names.text(e.token) for e in entries], token_logprobs=[e.logprob for e in entries],
                              top_logprobs=tops, text_offset=[e.offset for e in entries])


def vllm_prompt_logprobs(names: TokenNames, entries: Sequence[TokenLogprob], k: int) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token, None for the first, else the token and the ``k``
    most likely there, by token id."""
    out: list[dict[str, PromptLogprob] | None] = []
    for e in entries:
        if e.logprob is None:
            out.append(None)
            continue
        top = {str(t): PromptLogprob(logprob=lp, rank=r, decoded_token=names.text(t)) for r, (t, lp) in enumerate(e.top[:k], 1)}
        top.setdefault(str(e.token), PromptLogprob(logprob=e.logprob, rank=e.rank, decoded_token=names.text(e.token)))
        out.append(top)
    return out


@dataclass
class Outcome:
    """One choice, collected for a complete (non-streamed) response."""

    text: list[str] = field(default_factory=list)
    finish: FinishReason = "stop"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt: list[TokenLogprob] = field(default_factory=list)

    def add(self, delta: Delta) -> None:
        self.text.append(delta.text)
        self.finish = delta.finish or self.finish
        self.logprobs += delta.logprobs
        self.prompt += delta.prompt


class Format(ABC):
    """How one endpoint shapes its streamed chunks and its complete response."""

    _chunk_type: ClassVar[type[ChatCompletionChunk] | type[CompletionChunk]]

    def __init__(self, job: Job, names: TokenNames) -> None:
        self._job = job
        self._names = names
        self._logprobs = job.params.logprobs is not None

    def _head(self) -> dict[str, Any]:
        return {"id": self._job.id, "created": self._job.created, "model": self._job.model}

    def _chunk(self, choices: list[Any], usage: Usage | None = None) -> str:
        return self._chunk_type(**self._head(), choices=choices, usage=usage).sse()

    def opening(self) -> list[str]:
        return []

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage)

    @abstractmethod
    def delta(self, delta: Delta) -> str: ...

    @abstractmethod
    def finish(self, choice: int, reason: FinishReason) -> str: ...

    @abstractmethod
    def complete(self, outcomes: Sequence[Outcome], usage: Usage) -> BaseModel: ...


class ChatFormat(Format):
    """Chat chunks; with ``tools`` (the template's call format) each choice's text is parsed into tool calls."""

    _chunk_type = ChatCompletionChunk

    def __init__(self, job: Job, names: TokenNames, tools: ToolFormat | None = None, parallel: bool = True) -> None:
        super().__init__(job, names)
        self._tools, self._parallel = tools, parallel
        self._streams = [ToolStream(tools, parallel) for _ in range(job.n)] if tools is not None else None

    def opening(self) -> list[str]:
        return [self._chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                for i in range(self._job.n)]

    def delta(self, delta: Delta) -> str:
        stream = self._streams[delta.index] if self._streams is not None else None
        text = stream.feed(delta.text) if stream is not None else delta.text
        calls = stream.take_calls() if stream is not None else []
        chunks = ""
        if text or delta.logprobs:
            logprobs = chat_logprobs(self._names, delta.logprobs) if self._logprobs else None
            chunks = self._chunk([ChatChunkChoice(index=delta.index, delta=DeltaMessage(content=text), logprobs=logprobs)])
        if calls:
            chunks += self._chunk([ChatChunkChoice(index=delta.index, delta=DeltaMessage(tool_calls=calls))])
        return chunks

    def finish(self, choice: int, reason: FinishReason) -> str:
        chunks = ""
        if self._streams is not None:
            rest = self._streams[choice].finish()
            if rest.content:
                chunks = self._chunk([ChatChunkChoice(index=choice, delta=DeltaMessage(content=rest.content))])
            if rest.calls:
                chunks += self._chunk([ChatChunkChoice(index=choice, delta=DeltaMessage(tool_calls=rest.calls))])
            if self._streams[choice].complete:
                reason = "tool_calls"
        return chunks + self._chunk([ChatChunkChoice(index=choice, delta=DeltaMessage(), finish_reason=reason)])

    def complete(self, outcomes: Sequence[Outcome], usage: Usage) -> BaseModel:
        return ChatCompletion(**self._head(), choices=[self._choice(i, o) for i, o in enumerate(outcomes)], usage=usage)

    def _choice(self, index: int, outcome: Outcome) -> ChatChoice:
        text, reason = "".join(outcome.text), outcome.finish
        message = AssistantMessage(content=text)
        if self._tools is not None:
            parsed = parse_all(self._tools, text, self._parallel)
            if parsed.calls:
                message = AssistantMessage(content=parsed.content or None, tool_calls=parsed.calls)
                reason = "tool_calls"
        logprobs = chat_logprobs(self._names, outcome.logprobs) if self._logprobs else None
        return ChatChoice(index=index, message=message, finish_reason=reason, logprobs=logprobs)


class CompletionFormat(Format):
    """Text completions: with echo and logprobs, the legacy lists start with the prompt's tokens; vLLM's
    ``prompt_logprobs`` when asked."""

    _chunk_type = CompletionChunk

    def __init__(self, job: Job, names: TokenNames, prompt_logprobs: int | None = None) -> None:
        super().__init__(job, names)
        self._prompt_logprobs = prompt_logprobs

    def _choice(self, index: int, text: str, entries: Sequence[TokenLogprob], prompt: Sequence[TokenLogprob],
                finish: FinishReason | None = None) -> CompletionChoice:
        echoed = tuple(prompt) if self._job.echo else ()
        logprobs = completion_logprobs(self._names, echoed + tuple(entries), self._job.params.logprobs) if self._logprobs else None
        asked = self._prompt_logprobs is not None and prompt
        vllm = vllm_prompt_logprobs(self._names, prompt, self._prompt_logprobs) if asked else None
        return CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs, prompt_logprobs=vllm)

    def opening(self) -> list[str]:
        if not self._job.echo:
            return []
        return [self._chunk([CompletionChoice(index=i, text=self._job.echo)]) for i in range(self._job.n)]

    def delta(self, delta: Delta) -> str:
        return self._chunk([self._choice(delta.index, delta.text, delta.logprobs, delta.prompt)])

    def finish(self, choice: int, reason: FinishReason) -> str:
        return self._chunk([CompletionChoice(index=choice, text="", finish_reason=reason)])

    def complete(self, outcomes: Sequence[Outcome], usage: Usage) -> BaseModel:
        choices = [self._choice(i, self._job.echo + "".join(o.text), o.logprobs, o.prompt, o.finish)
                   for i, o in enumerate(outcomes)]
        return Completion(**self._head(), choices=choices, usage=usage)


def usage_of(job: Job, generations: Sequence[Generation]) -> Usage:
    """The prompt counts once, however many choices shared it."""
    return Usage.of(len(job.prompt_ids), sum(g.completion_tokens for g in generations))


class EventStream(StreamingResponse):
    """SSE response that closes its event generator however the response ends (disconnect too)."""

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()


async def events(generations: Sequence[Generation], fmt: Format, job: Job) -> AsyncGenerator[str, None]:
    try:
        for chunk in fmt.opening():
            yield chunk
        async for delta in merged(generations):
            if (delta.text or delta.logprobs or delta.prompt) and (chunk := fmt.delta(delta)):
                yield chunk
            if delta.finish is not None:
                yield fmt.finish(delta.index, delta.finish)
        if job.include_usage:
            yield fmt.usage(usage_of(job, generations))
    except Exception as exc:
        yield api_error(exc).sse()
    finally:
        await close_all(generations)
    yield _DONE


async def collect(generations: Sequence[Generation], fmt: Format, job: Job) -> BaseModel:
    """The complete response of a request that is not streamed."""
    outcomes = [Outcome() for _ in generations]
    try:
        async for delta in merged(generations):
            outcomes[delta.index].add(delta)
    finally:
        await close_all(generations)
    return fmt.complete(outcomes, usage_of(job, generations))
