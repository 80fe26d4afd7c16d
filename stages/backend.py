"""The seam between the engine (scheduling, wire, NATS) and a compute backend (PyTorch, MLX, ...).

The engine hands a backend plain bytes + dtype names; a backend hands back bytes or token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from parallax.broker.wire import Logprobs, SamplingParams

if TYPE_CHECKING:
    from .grammar import Constraint


@dataclass(frozen=True)
class StageSpec:
    model: str
    start: int
    end: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    dtype: str  # activation dtype on the wire ("float32", "bfloat16", ...)
    device: str

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.num_layers:
            raise ValueError(f"layers {self.start}:{self.end} are outside 0:{self.num_layers}")

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.num_layers


@dataclass(frozen=True)
class SampleSpec:
    params: SamplingParams
    history: tuple[int, ...]  # prompt + generated ids; empty when there is no repetition penalty
    step: int  # index of the token being sampled (= tokens generated so far)
    constraint: Constraint | None = None  # structured output: the sampler masks what its grammar forbids
    generated: tuple[int, ...] = ()  # the output so far; empty without frequency or presence penalty

    @property
    def banned(self) -> tuple[int, ...]:
        """Token ids that must not be sampled now: the stop tokens, before ``min_tokens``."""
        return () if self.params.can_stop(self.step) else self.params.stop_token_ids


@dataclass(frozen=True)
class PromptScore:
    """Last stage: the prompt logprobs of an item's rows; its row ``j`` predicts ``targets[j]``."""

    targets: tuple[int, ...]  # the prompt ids after the item's first rows (all of them but a final chunk's last)
    top: int  # the most likely tokens reported besides each target


@dataclass(frozen=True)
class StepItem:
    rid: str
    pos: int
    n: int
    data: memoryview  # n rows: int32 token ids (first stage) or hidden states
    dtype: str
    sample: SampleSpec | None  # last stage only: sample a token after this item
    blocks: tuple[int, ...]  # KV block table covering positions 0 .. pos+n-1 (of the first KV group)
    prompt: bool  # rows of the prompt (prefill), not a generated token: a backend may compute the two apart
    group_blocks: tuple[tuple[int, ...], ...] = ()  # the tables of the other KV groups (``init_kv``'s), if any
    score: PromptScore | None = None  # last stage only: the prompt logprobs of these rows

    @property
    def outputs(self) -> int:
        """Rows whose logits the last stage computes: its scored rows and the one it samples after, the
        item's last ones (a scored item's targets and sample cover all its rows)."""
        return (len(self.score.targets) if self.score is not None else 0) + (self.sample is not None)


@dataclass(frozen=True)
class StepOutput:
    hidden: memoryview | None  # [T, D] rows in item order (not the last stage)
    row_bytes: int  # bytes per row of ``hidden``
    tokens: tuple[int, ...]  # one per item with a SampleSpec, in order (last stage)
    logprobs: tuple[Logprobs | None, ...] = ()  # one per token when a request asked for them, else empty
    prompt_logprobs: tuple[tuple[Logprobs, ...] | None, ...] = ()  # one per item when one is scored, else empty


class Backend(Protocol):
    spec: StageSpec
    kernels: dict[str, str]  # which kernel each projection runs (chosen by measurement at load), for the registry
    kv_windows: tuple[int | None, ...]  # each layer's sliding window (None: full attention): ``blocks.kv_groups``

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes of keys + values that one block of ``block_size`` positions takes on this stage (every layer)."""
        ...

    def init_kv(self, num_blocks: int, block_size: int, group_blocks: tuple[int, ...] = ()) -> None:
        """Allocate the paged KV pool (the engine's block managers hand out its blocks): one pool of
        ``num_blocks`` for every layer; or, with ``group_blocks``, one per KV group of ``blocks.kv_groups(
        kv_windows)``: ``num_blocks`` for the first, ``group_blocks`` for the others (``StepItem.group_blocks``)."""
        ...

    def run(self, items: list[StepItem]) -> StepOutput:
        """One forward over all items; rows before ``pos`` are read from the KV pool."""
        ...

    def release(self, rid: str) -> None:
        """Drop per-request state kept by the backend (sampler); unknown ids are ignored."""
        ...
