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


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``"8GiB"``, ``"512MiB"``, ``"300KB"``, ``"1.5"`` (a bare number is GiB) -> bytes."""
    match = _SIZE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"size must look like 8GiB, 512MiB, 300KiB or a number of GiB, got {text!r}")
    value, unit = float(match.group(1)), (match.group(2) or "gib").lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size
