"""Kernel choice by measurement: which kernel runs each projection shape + weight format on this machine.

At stage load, ``tune`` times the candidate kernels of every distinct (format, O, I) of the stage's
projections at the row counts that occur (generated-token rows ``DECODE_ROWS``, prompt rows
``PREFILL_ROWS``) and picks one per (shape + format, row kind): the least time per row summed over those
row counts (one stream's step weighs as much as a full step's), each candidate measured ``ROUNDS`` times in
turn (its best round counts), among the batch-invariant ones. A candidate is batch-invariant if it gives each row the same bits
at every row count measured or in ``CHECK_ROWS`` as at the largest, and at another place in the batch (``SHIFT``;
checked on the very calls that are timed); the numba tile
kernel always is, torch's GEMMs may or may not be, depending on the CPU, shape and library. One kernel per
row kind: a row's kernel never depends on how many rows its step has.

The picks are cached as JSON in ``$PARALLAX_CACHE`` (``~/.cache/parallax``)/kernels, one file per machine
key (CPU model, its flags, torch's thread count, torch and numba versions); a second load reads them
without timing. A corrupt cache file is ignored with a warning (and rewritten).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Protocol

import numba
import numpy as np
import torch
from filelock import FileLock

from parallax.broker.model import default_cache_dir

log = logging.getLogger(__name__)

DECODE_ROWS = (1, 4, 16)  # generated-token rows a step takes: up to MAX_ROWS per fused call
PREFILL_ROWS = (64, 256)  # prompt rows of a chunk
MAX_ROWS = DECODE_ROWS[-1]
ROWS = {"decode": DECODE_ROWS, "prefill": PREFILL_ROWS}
CHECK_ROWS = {"decode": (3, 7), "prefill": (1, 3, 17, 100)}  # more row counts checked for invariance, not timed
SHIFT = 3  # and the largest count's rows run again without the first SHIFT: the same rows at other places
DEFAULT_PICKS = {"decode": "numba-gemv", "prefill": "numba"}
# Kernels that hold the weight in a layout of their own: both row kinds or neither, chosen
# by the generated-token rows (the ones a stage spends its time on).
OWN_LAYOUT = ("int4pack", "int8")  # stages.int4pack, stages.int8dot (batch-invariant everywhere)
BUDGET_S = 0.01  # time spent measuring one candidate at one row count (after a first call that is shorter)
MAX_CALLS = 10
ROUNDS = 3  # times every candidate is measured (its fastest round counts)
measurements = 0  # timed calls made (tests check that a cached load makes none)


class Tunable(Protocol):
    """A projection whose kernels can be chosen: ``stages.quant.Tiled`` (Matrix and QuantMatrix)."""

    shape: tuple[int, int]  # (O, I)
    picks: dict[str, str]  # row kind -> kernel name

    @property
    def fmt(self) -> str: ...

    def candidates(self, kind: str, dtype: torch.dtype) -> tuple[str, ...]: ...

    def run(self, name: str, x: np.ndarray) -> np.ndarray: ...

    def settle(self) -> None: ...  # hold the weight in the layout the picks read


class _Followed(threading.local):
    torch_threads: int | None = None  # torch's thread count when this thread last set numba's


_FOLLOWED = _Followed()


def follow_torch_threads() -> None:
    """numba's thread count is set per calling thread (the engine steps in a worker thread). Called before every
    layer: it asks numba (a lock and a check of its pool: 2.1 us a call, 0.3 without) only when torch's count changed
    in this thread."""
    threads = torch.get_num_threads()
    if _FOLLOWED.torch_threads != threads:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        _FOLLOWED.torch_threads = threads


_KERNEL_SOURCES = ("kernels.py", "quant.py", "int8dot.py", "bf16dot.py", "simd.py", "int4pack.py", "tuning.py")


def kernels_digest() -> str:
    """The kernels' code: a changed kernel is measured again, not judged by the old one's times."""
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in _KERNEL_SOURCES)).hexdigest()[:16]


def machine_key() -> dict[str, str | int]:
    """What a measurement holds for: the CPU (model name and flags), torch's thread count, the versions, and
    the kernels' code."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", info, re.M)
    return {"cpu": model.group(1).strip() if model else os.uname().machine,
            "flags": " ".join(sorted(set(flags.group(1).split()))) if flags else "",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "numba": numba.__version__,
            "kernels": kernels_digest()}


def cache_file(key: dict[str, str | int] | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key or machine_key(), sort_keys=True).encode()).hexdigest()[:16]
    return default_cache_dir() / "kernels" / f"{digest}.json"


def tune(projections: Iterable[Tunable], dtype: torch.dtype) -> dict[str, str]:
    """Set ``picks`` of every projection (measured, or read from the cache) for activations of ``dtype``.
    Returns the choice, e.g. {"1536x576 bf16 decode": "numba", "1536x576 bf16 prefill": "torch"}."""
    groups: dict[str, list[Tunable]] = {}
    for p in projections:
        O, I = p.shape
        groups.setdefault(f"{O}x{I} {p.fmt} {str(dtype).removeprefix('torch.')}", []).append(p)
    if not groups:
        return {}
    key = machine_key()
    path = cache_file(key)
    summary, new = {}, False
    with _locked(path):  # stages loading at once: one measures (alone on the CPU), the others reuse its picks
        cached = _read(path)
        for name, members in groups.items():
            entry, tried = cached.get(name), _tried(members[0], dtype)
            picks = entry.get("picks") if isinstance(entry, dict) and entry.get("tried") == tried else None
            if not _valid(picks, members[0], dtype):  # not measured, or measured among other candidates
                picks, new = measure(members[0], dtype), True
                cached[name] = {"picks": picks, "tried": tried}
            for p in members:
                p.picks.update(picks)
                p.settle()
            shape_fmt = name.rsplit(" ", 1)[0]
            summary.update({f"{shape_fmt} {kind}": pick for kind, pick in picks.items()})
        if new:
            _write(path, key, cached)
    log.info("kernels (%s, %d threads, %s): %s", "measured" if new else f"cached in {path}", key["threads"],
             str(dtype).removeprefix("torch."), ", ".join(f"{k} {v}" for k, v in summary.items()))
    return summary


def measure(p: Tunable, dtype: torch.dtype) -> dict[str, str]:
    """Time ``p``'s candidates for each row kind; pick the fastest batch-invariant one."""
    gen = torch.Generator().manual_seed(0)
    picks = {}
    for kind, rows in ROWS.items():  # decode first: it decides the layout
        names = p.candidates(kind, dtype) if kind == "decode" else _same_layout(p.candidates(kind, dtype), picks["decode"])
        if len(names) == 1:
            picks[kind] = names[0]
            continue
        x = torch.randn(rows[-1], p.shape[1], generator=gen).to(dtype).float().numpy()  # values of dtype
        scores: dict[str, float | None] = dict.fromkeys(names, float("inf"))
        for _ in range(ROUNDS):  # candidates in turn, each one's best round: a busy moment hits one try, not the pick
            for n in [n for n, s in scores.items() if s is not None]:
                best = min((s for s in scores.values() if s is not None), default=float("inf"))
                score = _score(p, n, x, rows, best, CHECK_ROWS[kind])
                scores[n] = None if score is None else min(score, scores[n])
        eligible = {n: s for n, s in scores.items() if s is not None and s < float("inf")}
        picks[kind] = min(eligible, key=eligible.get) if eligible else DEFAULT_PICKS[kind]
        log.debug("%sx%s %s %s: %s", *p.shape, p.fmt, kind, scores)
    return picks


def _score(p: Tunable, name: str, x: np.ndarray, rows: tuple[int, ...], bound: float = float("inf"),
           check: tuple[int, ...] = ()) -> float | None:
    """Seconds per row summed over the row counts, infinity once the sum passes ``bound`` (the best so far:
    this one has lost), or None if a row's bits change with the row count or the row's place in the batch. A call longer than BUDGET_S is timed once after the first (which may compile, or repack a weight).
    The row counts in ``check`` are only run, for the invariance check."""
    global measurements
    total, outs = 0.0, {}
    for m in rows:
        xm = x[:m]
        t = time.perf_counter()
        outs[m] = p.run(name, xm)  # warm-up (first touch), and the result checked below
        times, spent = [time.perf_counter() - t], time.perf_counter()
        measurements += 1
        while len(times) < 2 or (times[0] < BUDGET_S and (len(times) < 3 or time.perf_counter() - spent < BUDGET_S)
                                 and len(times) < MAX_CALLS):
            t = time.perf_counter()
            p.run(name, xm)
            times.append(time.perf_counter() - t)
            measurements += 1
        total += min(times[1:] or times) / m  # per row: one stream's step counts as much as a full one's
        if total > bound:
            return float("inf")
    for m in check:
        outs[m] = p.run(name, x[:m])
    big = outs[rows[-1]]
    if not all(np.array_equal(out, big[:m], equal_nan=True) for m, out in outs.items()):
        return None
    shifted = p.run(name, x[SHIFT:rows[-1]])  # the same rows at other places (torch's bf16 GEMM can fail only this)
    return total if np.array_equal(shifted, big[SHIFT:], equal_nan=True) else None


def _tried(p: Tunable, dtype: torch.dtype) -> dict[str, list[str]]:
    return {kind: list(p.candidates(kind, dtype)) for kind in ROWS}


def _same_layout(names: tuple[str, ...], decode: str) -> tuple[str, ...]:
    """Prompt-row candidates that read the weight in the layout the decode pick holds it in."""
    return (decode,) if decode in OWN_LAYOUT else tuple(n for n in names if n not in OWN_LAYOUT)


def _valid(picks: object, p: Tunable, dtype: torch.dtype) -> bool:
    return (isinstance(picks, dict) and set(picks) == set(ROWS)
            and all(picks[kind] in p.candidates(kind, dtype) for kind in ROWS)
            and picks["prefill"] in _same_layout((picks["prefill"],), picks["decode"]))


def _locked(path: Path) -> contextlib.AbstractContextManager:
    """The cache's lock file, or nothing where the cache folder cannot be made (then only logged)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("kernel choice cache folder %s: %s", path.parent, e)
        return contextlib.nullcontext()
    return FileLock(str(path) + ".lock")


def _read(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        picks = json.loads(path.read_text())["picks"]
        if not isinstance(picks, dict):
            raise ValueError("'picks' is not an object")
        return picks
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the kernel choice cache %s (%s): measuring again", path, e)
        return {}


def _write(path: Path, key: dict, picks: dict) -> None:
    """Atomically (another stage may load beside this one); a cache that cannot be written is only logged."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump({"machine": key, "picks": picks}, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError as e:
        log.warning("could not write the kernel choice cache %s: %s", path, e)
