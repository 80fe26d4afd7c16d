"""Splitting a model's layers into contiguous, half-open ranges (``a:b`` serves layers a..b-1)."""

from __future__ import annotations

import re

_RANGE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def even_split(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """``stages`` contiguous ranges covering 0..num_layers once; earlier ranges get the extra layers."""
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"a model needs at least 1 layer, got {num_layers!r}")
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"need at least 1 stage, got {stages!r}")
    if stages > num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {stages} stages (at most one stage per layer)")
    base, extra = divmod(num_layers, stages)
    ranges, start = [], 0
    for index in range(stages):
        end = start + base + (1 if index < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def parse_layers(text: str) -> tuple[int, int]:
    """``"0:15"`` -> ``(0, 15)``; the range must be non-empty (start < end)."""
    match = _RANGE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"layer range must look like 'start:end' (e.g. 0:15), got {text!r}")
    start, end = int(match.group(1)), int(match.group(2))
    if start >= end:
        raise ValueError(f"layer range {text!r} is empty: start must be below end")
    return start, end


def format_layers(start: int, end: int) -> str:
    """``(0, 15)`` -> ``"0:15"`` (the inverse of :func:`parse_layers`)."""
    return f"{start}:{end}"
