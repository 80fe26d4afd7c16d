"""Wire format: ``b"PXW1" | u32 header length | orjson header | raw tensor bytes``.

The header is validated by the pydantic models below; the tensor is plain dtype + shape + bytes
(C order, little endian) so that any backend (PyTorch, MLX, ...) can read it. Never pickle.
Messages above the server's ``max_payload`` are split by :mod:`parallax.broker.chunks`.
"""

from __future__ import annotations

import struct
from math import prod
from typing import Annotated, Literal, Union

import orjson
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, ValidatorFunctionWrapHandler,
    field_validator, model_validator,
)

from .errors import WireError

MAGIC = b"PXW1"
_LEN = struct.Struct(">I")
DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The smallest positive temperature, top_p and repetition penalty. The sampler works in float32: logits
# divided by a smaller temperature or penalty overflow to inf, a smaller top_p rounds to 0 and drops
# every token; either way its softmax gives NaN.
MIN_POSITIVE = 1e-5


def _greedy_or_usable(temperature: float) -> float:
    if 0.0 < temperature < MIN_POSITIVE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_POSITIVE:g}, got {temperature:g}")
    return temperature


# The bounds of every sampling parameter, written once: the gateway's request models use them too.
Temperature = Annotated[float, Field(ge=0.0, allow_inf_nan=False), AfterValidator(_greedy_or_usable)]  # 0: greedy
TopP = Annotated[float, Field(ge=MIN_POSITIVE, le=1.0, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=-1)]  # -1 or 0: off
MaxTokens = Annotated[int, Field(ge=1)]
MinTokens = Annotated[int, Field(ge=0)]
RepetitionPenalty = Annotated[float, Field(ge=MIN_POSITIVE, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]  # frequency_penalty, presence_penalty (OpenAI's)
LogitBias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]
TopLogprobs = Annotated[int, Field(ge=0, le=20)]  # the most likely tokens reported besides the sampled one
TokenId = Annotated[int, Field(ge=0)]
Finish = Literal["stop", "length"]  # why the last stage ended a request
NodeId = Annotated[str, Field(min_length=1)]
GrammarKind = Literal["json_object", "json_schema", "regex", "ebnf"]


class Grammar(_Strict):
    """Structured output: the last stage masks every token the grammar does not allow (the stage
    compiles ``spec`` once and caches it by text). ``spec``: the JSON schema as JSON text, the regex,
    or the grammar in the library's EBNF; empty for ``json_object`` (any JSON object)."""

    kind: GrammarKind
    spec: str = ""
    replay: int = Field(0, ge=0)  # the prompt's last ``replay`` ids were generated under this grammar (a resumed request)


def _zero(value: float) -> bool:
    return value == 0.0


def _empty(value: tuple) -> bool:
    return not value


class SamplingParams(_Strict):
    """How the last stage picks a token and when it ends the request. The defaults here are the
    API's defaults too (the gateway leaves out what a client did not send)."""

    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1
    seed: int | None = None
    max_tokens: MaxTokens = 16
    min_tokens: MinTokens = 0  # no stop (token or string) ends the output before this many tokens
    ignore_eos: bool = False
    repetition_penalty: RepetitionPenalty = 1.0
    # The next three are left out on the wire while unused (at their defaults), so that a stage of an
    # earlier version still reads the message.
    frequency_penalty: Penalty = Field(0.0, exclude_if=_zero)  # minus this per occurrence of the token in the output
    presence_penalty: Penalty = Field(0.0, exclude_if=_zero)  # minus this once when the token is in the output
    logit_bias: tuple[tuple[TokenId, LogitBias], ...] = Field((), exclude_if=_empty)  # (token id, added to its logit)
    logprobs: TopLogprobs | None = None  # None: no logprobs; k: the sampled token's and the k most likely
    # None: none; k: the logprobs of every prompt token after the first and the k most likely there,
    # sent with the first token (the last stage computes every prompt row: no prefix cache for them)
    prompt_logprobs: TopLogprobs | None = None
    stop_token_ids: tuple[int, ...] = ()
    grammar: Grammar | None = None  # structured output, enforced by the last stage
    # Tokens the request generated before this try (a resumed request): the sampler counts token
    # numbers from the request's first one, so a seed draws the same token i on every try. Left out
    # on the wire for a first try (None), so a stage of an earlier version still reads the message.
    token_offset: Annotated[int, Field(ge=0)] | None = None

    @field_validator("logit_bias", mode="wrap")
    @classmethod
    def _bias_pairs(cls, bias: object, handler: ValidatorFunctionWrapHandler) -> tuple[tuple[int, float], ...]:
        """OpenAI's ``{"token id": bias}`` as (id, bias) pairs in id order."""
        return tuple(sorted(handler(list(bias.items()) if isinstance(bias, dict) else bias)))

    @field_validator("min_tokens")
    @classmethod
    def _at_most_max(cls, min_tokens: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")
        if max_tokens is not None and min_tokens > max_tokens:
            raise ValueError(f"{min_tokens} is larger than max_tokens ({max_tokens})")
        return min_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def can_stop(self, generated: int) -> bool:
        """Whether a stop may end the output once it has ``generated`` tokens (vLLM's min_tokens:
        the sampler bans stop tokens before, the gateway ignores stop strings before)."""
        return generated >= self.min_tokens

    @property
    def first_index(self) -> int:
        """The number, within the whole request, of the first token this try generates."""
        return self.token_offset or 0

    def rest(self, done: int) -> "SamplingParams":
        """The parameters for the rest of a request that already has ``done`` tokens (a resubmission):
        what is left of max_tokens and min_tokens, and the token numbers going on from ``done``."""
        if not done:
            return self
        rest = {"max_tokens": self.max_tokens - done, "min_tokens": max(0, self.min_tokens - done),
                "token_offset": self.first_index + done}
        if self.grammar is not None:
            rest["grammar"] = self.grammar.model_copy(update={"replay": self.grammar.replay + done})
        rest["prompt_logprobs"] = None  # they came with the first token
        return SamplingParams.model_validate(self.model_dump() | rest)  # validated: done < max_tokens


class RequestMeta(_Strict):
    """Travels with the first message of a request through every stage."""

    reply: str  # gateway subject that receives tokens and errors
    chain: tuple[tuple[int, int], ...]  # layer ranges, in order, covering 0..L
    route: tuple[NodeId, ...]  # the replica serving each hop, chosen by the gateway
    sampling: SamplingParams
    prompt_ids: tuple[int, ...]
    prefix_cache: bool = True  # False: compute the whole prompt (retry after a prefix-cache miss)

    @model_validator(mode="after")
    def _check(self) -> "RequestMeta":
        if not self.chain or len(self.route) != len(self.chain):
            raise ValueError("chain must be non-empty and route must have one entry per hop")
        if self.chain[0][0] != 0 or any(a[1] != b[0] for a, b in zip(self.chain, self.chain[1:])):
            raise ValueError(f"chain {self.chain} is not contiguous from layer 0")
        if any(a >= b for a, b in self.chain):
            raise ValueError(f"chain {self.chain} has an empty range")
        return self


class ForwardItem(_Strict):
    """``n`` rows of the message tensor for request ``rid``, at positions ``pos .. pos+n-1``."""

    rid: str
    pos: int = Field(ge=0)
    n: int = Field(ge=1)
    meta: RequestMeta | None = None  # present on a request's first message only
    sample: bool = True  # the last stage samples after this item (False for non-final prefill chunks)


class Forward(_Strict):
    """Work for a stage: token ids (int32, shape [T]) for stage 0, hidden states [T, D] after."""

    kind: Literal["fwd"] = "fwd"
    items: tuple[ForwardItem, ...] = Field(min_length=1)
    dtype: str
    shape: tuple[int, ...]
    sent: float | None = None  # sender's wall clock (s) when it published: hop latency

    @model_validator(mode="after")
    def _check(self) -> "Forward":
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"unknown dtype {self.dtype!r}")
        rows = sum(i.n for i in self.items)
        if not self.shape or self.shape[0] != rows:
            raise ValueError(f"shape {self.shape} does not hold {rows} rows")
        return self

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPE_SIZES[self.dtype]


class Logprobs(_Strict):
    """Log-probabilities of the raw model (log_softmax of its logits, before any sampling parameter)."""

    logprob: float  # of the sampled token
    top: tuple[tuple[int, float], ...] = ()  # the k most likely (token id, logprob), most likely first
    rank: int | None = Field(None, ge=1)  # prompt logprobs only: the token's rank (1: the most likely)


class TokenOut(_Strict):
    rid: str
    token: int
    index: int  # 0 for the first generated token
    finish: Finish | None = None  # set on a request's last token: the gateway trusts it
    logprobs: Logprobs | None = None  # only when the request asked (SamplingParams.logprobs)
    # on the first token of a request that asked (SamplingParams.prompt_logprobs): prompt tokens 1.. in order
    prompt_logprobs: tuple[Logprobs, ...] | None = None


class Tokens(_Strict):
    kind: Literal["tokens"] = "tokens"
    items: tuple[TokenOut, ...] = Field(min_length=1)


ErrorCode = Literal["bad_request", "internal", "preempted", "prefix_miss", "no_memory", "draining"]
RETRYABLE: frozenset[str] = frozenset({"preempted", "prefix_miss"})  # the gateway resubmits these


class ErrorMsg(_Strict):
    kind: Literal["error"] = "error"
    rid: str | None = None
    message: str
    node: str | None = None
    code: ErrorCode = "bad_request"


class Release(_Strict):
    kind: Literal["release"] = "release"
    rids: tuple[str, ...]


Message = Union[Forward, Tokens, ErrorMsg, Release]
Header = Annotated[Message, Field(discriminator="kind")]
_HEADER = TypeAdapter(Header)


def encode(header: BaseModel, data: bytes | memoryview = b"") -> bytes:
    """Header + raw bytes as one payload. ``data`` must match a Forward's dtype and shape."""
    if isinstance(header, Forward) and len(data) != header.nbytes:
        raise WireError(f"tensor has {len(data)} bytes, header says {header.nbytes}")
    head = orjson.dumps(header.model_dump(mode="json", exclude_none=True))
    return b"".join((MAGIC, _LEN.pack(len(head)), head, data))


def decode(payload: bytes) -> tuple[Message, memoryview]:
    """Parse a payload; raises :class:`WireError` with a one-line reason if it is malformed."""
    view = memoryview(payload)
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise WireError("not a Parallax message (bad magic)")
    (size,) = _LEN.unpack(view[4:8])
    if 8 + size > len(view):
        raise WireError("header length runs past the payload")
    try:
        header = _HEADER.validate_python(orjson.loads(view[8 : 8 + size]))
    except (orjson.JSONDecodeError, ValidationError) as e:
        raise WireError(f"bad header: {_one_line(e)}") from None
    data = view[8 + size :]
    expected = header.nbytes if isinstance(header, Forward) else 0
    if len(data) != expected:
        raise WireError(f"tensor has {len(data)} bytes, header says {expected}")
    return header, data


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]
