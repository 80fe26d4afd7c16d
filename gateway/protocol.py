"""OpenAI-compatible request and response bodies (the subset the gateway serves).

Requests ignore unknown fields, like vLLM does, so that stock OpenAI clients (which send ``user``,
``metadata`` ...) work. Fields that would change the meaning of the answer and that the gateway
cannot honour (``suffix``, ``best_of`` other than ``n`` ...) are rejected with a clear message.
Sampling fields take their bounds from the wire's :class:`SamplingParams` and default to None,
which means "SamplingParams' default" (:meth:`GenerationRequest.sampling`).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_serializer,
)

from parallax.broker.wire import (
    Finish,
    LogitBias,
    MaxTokens,
    MinTokens,
    Penalty,
    RepetitionPenalty,
    SamplingParams,
    Temperature,
    TokenId,
    TopK,
    TopLogprobs,
    TopP,
)

from .structured import StructuredRequest
from .tools import ToolCall, ToolsRequest

FinishReason = Finish | Literal["tool_calls"]
MAX_CHOICES = 64  # n: choices of one request (each one holds its own KV while it runs)
Choices = Annotated[int, Field(ge=1, le=MAX_CHOICES)]
LegacyLogprobs = Annotated[int, Field(ge=0, le=5)]  # completions' logprobs: OpenAI's bound


def _expect(description: str) -> WrapValidator:
    """One readable error for a union field instead of one error per union member."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"must be {description}") from None

    return WrapValidator(validate)


StopField = Annotated[str | list[str] | None, _expect("a string or a list of strings")]
PromptField = Annotated[
    str | list[TokenId] | list[str] | list[list[TokenId]],
    _expect("a string or a list of token ids (>= 0), or a list with one of those"),
]


# --------------------------------------------------------------------------------------- errors
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ------------------------------------------------------------------------------------- requests
class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class GenerationRequest(StructuredRequest):
    """Fields shared by chat and text completions (OpenAI + vLLM extra sampling params, structured outputs)."""

    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: int | None = None
    stop: StopField = None
    n: Choices = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extra body parameters
    top_k: TopK | None = None
    min_tokens: MinTokens | None = None
    ignore_eos: bool | None = None
    repetition_penalty: RepetitionPenalty | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[TokenId, LogitBias] | None = None  # token id -> added to its logit
    # seconds from arrival until the request is released and ends with an error (the gateway's default when None)
    timeout: float | None = Field(None, gt=0, allow_inf_nan=False)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        """How many most likely tokens to report besides each sampled one; None: no logprobs."""
        return None

    def requested_prompt_logprobs(self) -> int | None:
        """How many most likely tokens to report at each prompt token; None: no prompt logprobs."""
        return None

    def sampling(self, max_tokens: int, stop_token_ids: tuple[int, ...]) -> SamplingParams:
        """The wire's parameters: the fields the client sent, SamplingParams' defaults for the rest.
        Raises ``ValidationError`` when they do not fit together (min_tokens > max_tokens)."""
        sent = {name: getattr(self, name) for name in _SAMPLED if getattr(self, name) is not None}
        return SamplingParams(**sent, max_tokens=max_tokens, stop_token_ids=stop_token_ids,
                              logprobs=self.requested_logprobs(), prompt_logprobs=self.requested_prompt_logprobs())


_SAMPLED = tuple(sorted(set(GenerationRequest.model_fields) & set(SamplingParams.model_fields) - {"max_tokens"}))


class TextPart(_Request):
    type: Literal["text"]
    text: str


ContentField = Annotated[
    str | list[TextPart] | None, _expect('a string or a list of {"type": "text", "text": ...} parts')
]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: ContentField = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls, fed back
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationRequest, ToolsRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationRequest):
    prompt: PromptField
    echo: bool = False  # the prompt's text before each choice's output (with logprobs: the prompt tokens' too)
    logprobs: LegacyLogprobs | None = None
    prompt_logprobs: TopLogprobs | None = None  # vLLM's extra: each choice's ``prompt_logprobs``
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[Any]) -> str | list[Any]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError(f"only one prompt per request is supported (got {len(prompt)})")
            prompt = prompt[0]
        if len(prompt) == 0:
            raise ValueError("prompt must not be empty")
        return prompt

    @field_validator("best_of")
    @classmethod
    def _same_as_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if value is not None and value != n:
            raise ValueError(f"best_of is not supported (only best_of = n, which returns every choice; n = {n})")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported")
        return value

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def requested_prompt_logprobs(self) -> int | None:
        asked = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs) if k is not None]
        return max(asked) if asked else None

    def prompt_value(self) -> str | list[int]:
        """The single prompt, as text or token ids (the validator unwrapped one-element batches)."""
        prompt: Any = self.prompt
        return prompt


# ------------------------------------------------------------------------------------ responses
def _now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class _Head(BaseModel):
    """What every completion object and chunk starts with (``object`` is set by each kind)."""

    id: str
    object: str
    created: int
    model: str


class _Chunk(_Head):
    """A streamed object: ``usage`` is only present when it carries data (OpenAI sends it last)."""

    usage: Usage | None = None

    def sse(self) -> str:
        body = self.model_dump_json(exclude={"usage"} if self.usage is None else None)
        return f"data: {body}\n\n"


class _Choice(BaseModel):
    index: int = 0
    finish_reason: FinishReason | None = None  # set on the last chunk of a stream


class TopLogprob(BaseModel):
    """A token and its log-probability, as chat completions report them."""

    token: str  # its text; "bytes:\\x.." when it holds only part of a UTF-8 character
    logprob: float
    bytes: list[int]  # its UTF-8 bytes


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the most likely tokens at this position, most likely first


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """Text completions' (legacy) logprobs: one entry per token in every list (with ``echo``, the prompt's
    tokens first: the first one has no logprob, None)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]  # the most likely tokens and the sampled (or prompt) one
    text_offset: list[int]  # where each token's text starts in the choice's text


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _no_empty_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k != "tool_calls" or v}


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(_Head):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(_Choice):
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(_Chunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class PromptLogprob(BaseModel):
    """vLLM's entry of a prompt position: a token's logprob, its rank (1: the most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None
    # vLLM's extra: per prompt token (None for the first) the token and the most likely ones, by token id
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None

    @model_serializer(mode="wrap")
    def _asked(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k != "prompt_logprobs" or v is not None}


class Completion(_Head):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Chunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "parallax"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AbortResult(BaseModel):
    id: str
    object: Literal["request.abort"] = "request.abort"
    aborted: Literal[True] = True


class Health(BaseModel):
    status: Literal["ok"] = "ok"
