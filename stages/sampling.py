"""Token sampling on the last stage: repetition penalty, bans, temperature, top-k, top-p."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

from .backend import SampleSpec
from .grammar import apply_masks


class Sampler:
    """Draws token ``i`` of a request (``i`` counted from its first generated token, across every try
    of it: :attr:`SamplingParams.first_index` + the try's own count) with a generator seeded from
    ``(seed, i)`` (:func:`token_seed`): counter-based, so a request resumed on another stage with its
    tokens so far draws exactly what an undisturbed run would, given the same logits. A request without
    a seed gets a random one, kept until it is released."""

    def __init__(self) -> None:
        self._generator = torch.Generator()  # re-seeded for every token: one draw each
        self._seeds: dict[str, int] = {}  # the random seed of each running request sent without one

    def release(self, rid: str) -> None:
        self._seeds.pop(rid, None)

    def sample(self, logits: torch.Tensor, rids: list[str], specs: list[SampleSpec]) -> list[int]:
        logits = apply_masks(logits, [spec.constraint for spec in specs])  # constrained rows only
        if all(_plain_greedy(spec) for spec in specs) and logits.device.type == "cpu":
            return greedy(logits)
        logits = logits.float()  # [S, V]
        return [self._one(logits[i], rid, spec) for i, (rid, spec) in enumerate(zip(rids, specs))]

    def _one(self, logits: torch.Tensor, rid: str, spec: SampleSpec) -> int:
        p = spec.params  # logits: [V]
        if p.repetition_penalty != 1.0 and spec.history:
            logits = _penalize(logits, spec.history, p.repetition_penalty)
        if spec.banned:
            logits = logits.index_fill(0, torch.tensor(spec.banned, device=logits.device), float("-inf"))
        if p.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(_truncate(logits / p.temperature, p.top_k, p.top_p), dim=-1)
        return int(torch.multinomial(probs.cpu(), 1, generator=self._generator_for(rid, spec)))

    def _generator_for(self, rid: str, spec: SampleSpec) -> torch.Generator:
        seed = spec.params.seed
        if seed is None:
            seed = self._seeds.setdefault(rid, random.getrandbits(63))
        self._generator.manual_seed(token_seed(seed, spec.params.first_index + spec.step))
        return self._generator


def token_seed(seed: int, index: int) -> int:
    """The generator seed for token ``index`` of a request seeded ``seed`` (any int): 64 bits of
    BLAKE2b over both, so neighbouring seeds and indices give unrelated streams (~2 us)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _plain_greedy(spec: SampleSpec) -> bool:
    p = spec.params
    return p.greedy and not spec.banned and (p.repetition_penalty == 1.0 or not spec.history)


def greedy(logits: torch.Tensor) -> list[int]:
    """The argmax of every row of CPU logits [S, V] (the first one on ties, NaN wins, like
    ``torch.argmax``), in numpy on the calling thread: torch would widen the logits and split
    the argmax over its OpenMP threads (one wake-up of its pool per token, whose spinning
    workers then compete with the next step's kernels for the cores)."""
    rows = logits.detach()
    if rows.dtype == torch.bfloat16:  # bf16 -> float32 is a 16-bit shift, exact
        bits = rows.contiguous().view(torch.int16).numpy().view(np.uint16)
        values = (bits.astype(np.uint32) << 16).view(np.float32)
    else:
        values = rows.numpy()
    return [int(i) for i in np.argmax(values, axis=-1)]


def _penalize(logits: torch.Tensor, history: tuple[int, ...], penalty: float) -> torch.Tensor:
    ids = torch.tensor(sorted(set(history)), device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keeps the token crossing top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits
