"""Token sampling on the last stage: logit bias, repetition / frequency / presence penalties, bans,
temperature, top-k, top-p; and the raw model's log-probabilities of the sampled tokens."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

from parallax.broker.wire import Logprobs

from .backend import SampleSpec, StepItem, StepOutput
from .grammar import apply_masks

LOWEST_LOGPROB = -9999.0  # reported for a token of probability 0 (OpenAI's floor; -inf has no JSON form)
SCORE_ROWS = 64  # prompt rows whose float32 log_softmax is held at once (64 x vocab floats)


def sample_step(sampler: "Sampler", logits: torch.Tensor, items: list[StepItem]) -> StepOutput:
    """The last stage's output of one step. logits: [R, V], each item's ``outputs`` rows in item order
    (its scored prompt rows, then the row it samples after)."""
    sampled = [i for i in items if i.sample is not None]
    specs = [i.sample for i in sampled]
    rows = logits  # [S, V]: the rows sampled from
    if any(i.score is not None for i in items):
        ends = torch.tensor([i.outputs for i in items]).cumsum(0)
        last = [int(end) - 1 for item, end in zip(items, ends) if item.sample is not None]
        rows = logits[torch.tensor(last, dtype=torch.long, device=logits.device)]
    tokens = sampler.sample(rows, [i.rid for i in sampled], specs)
    return StepOutput(None, 0, tuple(tokens), token_logprobs(rows, specs, tokens), prompt_logprobs(logits, items))


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
        logits = _adjust(logits.float(), specs)  # [S, V]
        return [self._one(logits[i], rid, spec) for i, (rid, spec) in enumerate(zip(rids, specs))]

    def _one(self, logits: torch.Tensor, rid: str, spec: SampleSpec) -> int:
        p = spec.params  # logits: [V]
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
    return spec.params.greedy and not spec.banned and not _biased(spec) and not _repeats(spec) and not _counted(spec)


def _biased(spec: SampleSpec) -> bool:
    return bool(spec.params.logit_bias)


def _repeats(spec: SampleSpec) -> bool:
    return spec.params.repetition_penalty != 1.0 and bool(spec.history)


def _counted(spec: SampleSpec) -> bool:
    p = spec.params
    return (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) and bool(spec.generated)


def _adjust(logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
    """Logit bias, then the repetition penalty, then frequency and presence penalties (vLLM's order),
    each applied at once to the rows whose request uses it; the other rows, and ``logits`` itself,
    are left alone. logits: [S, V] float32 -> [S, V]."""
    if rows := [i for i, spec in enumerate(specs) if _biased(spec)]:
        logits = _add_bias(logits, rows, [specs[i].params.logit_bias for i in rows])
    if rows := [i for i, spec in enumerate(specs) if _repeats(spec)]:
        logits = _penalize(logits, rows, specs)
    if rows := [i for i, spec in enumerate(specs) if _counted(spec)]:
        logits = _penalize_counts(logits, rows, specs)
    return logits


def _add_bias(logits: torch.Tensor, rows: list[int], biases: list[tuple[tuple[int, float], ...]]) -> torch.Tensor:
    at = torch.tensor([r for r, bias in zip(rows, biases) for _ in bias], device=logits.device)  # [B]
    ids = torch.tensor([t for bias in biases for t, _ in bias], device=logits.device)  # [B]
    values = torch.tensor([b for bias in biases for _, b in bias], device=logits.device)  # [B]
    return logits.index_put((at, ids), values, accumulate=True)


def _token_counts(lists: list[tuple[int, ...]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token id occurs in each list: [len(lists), vocab] float32."""
    at = torch.repeat_interleave(torch.arange(len(lists)), torch.tensor([len(ids) for ids in lists])).to(device)
    ids = torch.tensor([t for tokens in lists for t in tokens], device=device)
    counts = torch.zeros(len(lists), vocab, device=device)
    return counts.index_put_((at, ids), torch.ones(len(ids), device=device), accumulate=True)


def _penalize(logits: torch.Tensor, rows: list[int], specs: list[SampleSpec]) -> torch.Tensor:
    """vLLM's repetition penalty over prompt + output: a seen token's logit is divided by the penalty
    when positive, multiplied when negative."""
    seen = _token_counts([specs[i].history for i in rows], logits.shape[-1], logits.device) > 0  # [R, V]
    penalty = torch.tensor([specs[i].params.repetition_penalty for i in rows], device=logits.device)[:, None]  # [R, 1]
    picked = logits[rows]  # [R, V]
    penalized = torch.where(seen, torch.where(picked > 0, picked / penalty, picked * penalty), picked)
    return logits.index_put((torch.tensor(rows, device=logits.device),), penalized)


def _penalize_counts(logits: torch.Tensor, rows: list[int], specs: list[SampleSpec]) -> torch.Tensor:
    """OpenAI's frequency and presence penalties over the output so far:
    logit - frequency_penalty * count - presence_penalty * (count > 0)."""
    counts = _token_counts([specs[i].generated for i in rows], logits.shape[-1], logits.device)  # [R, V]
    frequency = torch.tensor([specs[i].params.frequency_penalty for i in rows], device=logits.device)[:, None]  # [R, 1]
    presence = torch.tensor([specs[i].params.presence_penalty for i in rows], device=logits.device)[:, None]  # [R, 1]
    penalized = logits[rows] - frequency * counts - presence * (counts > 0)
    return logits.index_put((torch.tensor(rows, device=logits.device),), penalized)


def token_logprobs(logits: torch.Tensor, specs: list[SampleSpec], tokens: list[int]) -> tuple[Logprobs | None, ...]:
    """The raw model's log-probabilities (log_softmax of ``logits`` [S, V] in float32: before logit
    bias, penalties, temperature, top-k and top-p, like vLLM's default; a structured output's mask,
    which the sampler applies in place first, does count, as in vLLM) of each row's sampled token
    and its ``logprobs`` most likely tokens, for the rows whose request asked; () when none did, so
    that requests without logprobs cost nothing."""
    asked = [i for i, spec in enumerate(specs) if spec.params.logprobs is not None]
    if not asked:
        return ()
    found = _logprobs(logits[asked], [tokens[i] for i in asked], [specs[i].params.logprobs for i in asked])
    out: list[Logprobs | None] = [None] * len(specs)
    for i, logprobs in zip(asked, found):
        out[i] = logprobs
    return tuple(out)


def prompt_logprobs(logits: torch.Tensor, items: list[StepItem]) -> tuple[tuple[Logprobs, ...] | None, ...]:
    """The raw model's log-probabilities of each scored item's prompt tokens (its ``score.targets``)
    and the ``score.top`` most likely tokens at each, from its first rows of ``logits`` ([R, V], each
    item's ``outputs`` rows in item order), ``SCORE_ROWS`` rows at a time; () when no item is scored."""
    if all(item.score is None for item in items):
        return ()
    out: list[tuple[Logprobs, ...] | None] = []
    at = 0
    for item in items:
        score = item.score
        if score is None:
            out.append(None)
        else:
            found: list[Logprobs] = []
            for a in range(0, len(score.targets), SCORE_ROWS):
                targets = score.targets[a : a + SCORE_ROWS]
                found += _logprobs(logits[at + a : at + a + len(targets)], list(targets), [score.top] * len(targets),
                                   ranked=True)
            out.append(tuple(found))
        at += item.outputs
    return tuple(out)


def _logprobs(logits: torch.Tensor, chosen: list[int], tops: list[int], ranked: bool = False) -> list[Logprobs]:
    """Row i of ``logits`` [A, V]: log_softmax in float32, the logprob of ``chosen[i]`` (and its rank:
    1 + the tokens more likely, when ``ranked``) and the ``tops[i]`` most likely (id, logprob), most likely first."""
    rows = torch.log_softmax(logits.float(), dim=-1)  # [A, V]
    rows = torch.nan_to_num(rows, nan=LOWEST_LOGPROB, neginf=LOWEST_LOGPROB)
    picked = rows.gather(1, torch.tensor(chosen, device=rows.device)[:, None])  # [A, 1]
    ranks = ((rows > picked).sum(-1) + 1).tolist() if ranked else [None] * len(chosen)  # [A]
    k = min(max(tops), rows.shape[-1])
    values, ids = (t.tolist() for t in torch.topk(rows, k))  # [A, k] each, most likely first
    return [Logprobs(logprob=lp, top=tuple(zip(i[:top], v[:top])), rank=rank)
            for lp, rank, i, v, top in zip(picked[:, 0].tolist(), ranks, ids, values, tops)]


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
