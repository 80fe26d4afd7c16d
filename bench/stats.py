"""Pure statistics over streamed requests: percentiles and per-level summaries (no I/O, no timing)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """One streamed request, timed with ``time.perf_counter()`` (seconds)."""

    start: float
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of every chunk that carried text
    completion_tokens: int | None = None  # from the usage chunk
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def tokens(self) -> int:
        """Completion tokens: the usage count, else the number of text chunks (one token each)."""
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def itls(self) -> list[float]:
        """Gaps between successive text chunks."""
        times = self.chunk_times
        return [b - a for a, b in itertools.pairwise(times)]

    @property
    def decode_time(self) -> float:
        return self.chunk_times[-1] - self.chunk_times[0] if self.chunk_times else 0.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation (numpy's default); None when empty."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in 0..100, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50 / p99 / mean of durations given in seconds, in milliseconds."""
    ms = [s * 1000.0 for s in seconds]
    return {
        "p50": percentile(ms, 50),
        "p99": percentile(ms, 99),
        "mean": sum(ms) / len(ms) if ms else None,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def decode_rate(records: Sequence[RequestRecord]) -> float | None:
    """Tokens after the first / time after the first token, summed over the successful requests."""
    done = [r for r in records if r.ok and r.tokens > 1]
    return ratio(float(sum(r.tokens - 1 for r in done)), sum(r.decode_time for r in done))


def decode_aggregate(records: Sequence[RequestRecord]) -> float | None:
    """Text chunks per second while every successful request was decoding (from the last first chunk to the
    first last chunk): the streams' joint decode rate, prefill left out, as a batched decode loop reports it.
    A chunk is one token unless the detokenizer held text back (a token that ends inside a character)."""
    done = [r for r in records if r.ok and len(r.chunk_times) > 1]
    if not done:
        return None
    start, end = max(r.chunk_times[0] for r in done), min(r.chunk_times[-1] for r in done)
    chunks = sum(1 for r in done for t in r.chunk_times if start < t <= end)
    return ratio(float(chunks), end - start) if end > start else None


def summarize_level(records: Sequence[RequestRecord], concurrency: int, wall_s: float) -> dict[str, Any]:
    """The numbers of one concurrency level (durations in ms, rates per second of ``wall_s``)."""
    done = [r for r in records if r.ok]
    tokens = sum(r.tokens for r in done)
    errors = sorted({r.error for r in records if r.error})
    return {
        "concurrency": concurrency,
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": errors[:5],
        "wall_s": wall_s,
        "completion_tokens": tokens,
        "ttft_ms": distribution_ms([r.ttft for r in done if r.ttft is not None]),
        "itl_ms": distribution_ms([gap for r in done for gap in r.itls]),
        "output_tok_s": ratio(float(tokens), wall_s),
        "req_s": ratio(float(len(done)), wall_s),
        "decode_tok_s_per_stream": decode_rate(done),
        "decode_tok_s_aggregate": decode_aggregate(done),
    }
