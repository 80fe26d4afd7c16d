"""The running side of a request: its ``n`` choices, each a pipeline stream turned into text deltas.

A :class:`Job` is a validated request. Each of its choices runs as its own pipeline request (id
``<id>`` for choice 0, ``<id>.<i>`` for choice i) with its own seed (:func:`choice_seed`). Choice 0
starts first; the others start once it has its first token, when every stage holds the prompt's
full KV blocks in its prefix cache: they compute only the prompt's last, partial block. A
:class:`Generation` turns one choice's tokens into :class:`Delta` s (text with stop strings applied,
and the tokens' logprobs when asked); :func:`merged` interleaves the deltas of every choice. Every
pipeline iterator is always closed (:func:`close_all`), so that the stages release the request.
Prompt logprobs (completions' echo with logprobs) come with choice 0's first token; the other
choices share them (they ask for none, and so use the prefix cache).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import cast

import anyio
import anyio.lowlevel
from transformers import PreTrainedTokenizerBase

from parallax.broker.errors import RequestTimedOut
from parallax.broker.wire import Logprobs, SamplingParams, TokenOut

from .detok import IncrementalDetokenizer, StopStrings
from .metrics import GatewayMetrics, RequestTimer
from .pipeline import Pipeline
from .protocol import MAX_CHOICES, FinishReason

logger = logging.getLogger(__name__)


def choice_rid(request_id: str, choice: int) -> str:
    """The pipeline request id of one choice of ``request_id`` (choice 0 runs under the request's own id)."""
    return request_id if choice == 0 else f"{request_id}.{choice}"


def choice_rids(request_id: str) -> list[str]:
    """Every id a choice of ``request_id`` may run under."""
    return [choice_rid(request_id, i) for i in range(MAX_CHOICES)]


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice ``choice`` of a request seeded with ``seed``: choice 0 keeps ``seed`` (n=1
    samples as it always did), the others a 63-bit hash of (seed, choice)."""
    if choice == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{choice}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Job:
    """A validated request, ready for the pipeline."""

    id: str
    model: str
    created: int
    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str]
    include_usage: bool
    timeout_s: float | None  # the request's deadline, from its arrival
    n: int = 1  # choices
    echo: str = ""  # text before each choice's output (completions' echo: the prompt)
    keep: frozenset[int] = frozenset()  # special token ids written as text (a tool format's markers)

    def choice_params(self, choice: int) -> SamplingParams:
        if choice == 0:
            return self.params
        seed = None if self.params.seed is None else choice_seed(self.params.seed, choice)
        return self.params.model_copy(update={"seed": seed, "prompt_logprobs": None})  # choice 0's are shared


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's logprobs (from the last stage), placed in its choice's text."""

    token: int
    logprob: float | None  # None: the prompt's first token (echo), which nothing predicts
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first
    offset: int  # characters of the choice's text (echo included) before this token's
    rank: int | None = None  # a prompt token's rank (1: the most likely there)


def prompt_entries(tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int], scored: Sequence[Logprobs],
                   echo: str) -> tuple[TokenLogprob, ...]:
    """The prompt tokens' logprobs (``scored``: tokens 1.. from the last stage) placed in the echoed
    prompt ``echo``: the first token has none; offsets as the prompt decodes token by token."""
    detok, offset, entries = IncrementalDetokenizer(tokenizer, ()), 0, []
    for i, token in enumerate(prompt_ids):
        lp = scored[i - 1] if 0 < i <= len(scored) else None
        entries.append(TokenLogprob(token, lp.logprob if lp else None, lp.top if lp else (), min(offset, len(echo)),
                                    lp.rank if lp else None))
        offset += len(detok.add(token))
    return tuple(entries)


@dataclass(frozen=True)
class Delta:
    text: str
    finish: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens whose text this delta completes
    index: int = 0  # the choice
    prompt: tuple[TokenLogprob, ...] = ()  # the prompt tokens' logprobs, with the choice's first delta


class Generation:
    """One running choice: pipeline tokens in, text deltas out, with stop strings applied."""

    def __init__(self, tokens: AsyncGenerator[TokenOut, None], job: Job, choice: int,
                 tokenizer: PreTrainedTokenizerBase, timer: RequestTimer) -> None:
        self._tokens = tokens
        self._timer = timer
        self._finish: FinishReason | None = None  # how it ended (None while running, or aborted)
        self._params = job.params
        self._index = choice
        self._detok = IncrementalDetokenizer(tokenizer, job.prompt_ids, job.keep)
        self._stops = StopStrings(job.stops)
        self._first: TokenOut | None = None
        self._closed = False
        self._deadline: asyncio.TimerHandle | None = None
        self._offset = len(job.echo)  # characters of text so far
        self._logprobs: list[TokenLogprob] = []  # of tokens whose text is not out yet
        self.prompt_logprobs: tuple[TokenLogprob, ...] = ()  # asked for: they go out with the first delta
        self._prompt_sent = False
        self.completion_tokens = 0

    @classmethod
    async def start(cls, pipeline: Pipeline, job: Job, choice: int, tokenizer: PreTrainedTokenizerBase,
                    metrics: GatewayMetrics) -> Generation:
        """Start one choice and wait for its first token, so that early errors become HTTP errors.
        Each choice is timed as a request of ``metrics``; the prompt's tokens count once (choice 0)."""
        rid = choice_rid(job.id, choice)
        tokens = cast(AsyncGenerator[TokenOut, None], pipeline.generate(rid, job.prompt_ids, job.choice_params(choice)))
        generation = cls(tokens, job, choice, tokenizer, metrics.request(len(job.prompt_ids) if choice == 0 else 0))
        if job.timeout_s is not None:
            error = RequestTimedOut(f"request {job.id} ran past its timeout of {job.timeout_s:g} s")
            generation._deadline = asyncio.get_running_loop().call_later(job.timeout_s, pipeline.cancel, rid, error)
        try:
            generation._first = await anext(tokens, None)
            generation._arrived(generation._first)
            if generation._first is not None and generation._first.prompt_logprobs is not None:
                scored = generation._first.prompt_logprobs
                generation.share(prompt_entries(tokenizer, job.prompt_ids, scored, job.echo))
        except BaseException:
            await generation.close()
            raise
        return generation

    def share(self, entries: tuple[TokenLogprob, ...]) -> None:
        """The prompt tokens' logprobs, sent with this choice's first delta."""
        self.prompt_logprobs = entries

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text deltas; the last one has ``finish`` set. The pipeline is closed before it is yielded."""
        token = self._first
        while token is not None:
            delta = self._step(token)
            if delta.finish is not None:
                self._finish = delta.finish
                await self.close()
                yield delta
                return
            if delta.text:
                yield delta
            token = await self._next()
        self._finish = "stop"
        await self.close()  # the pipeline ended without a finish flag: treat it as a stop
        yield Delta(self._stops.feed(self._detok.flush(), final=True)[0], "stop", self._take_logprobs(), self._index,
                    self._take_prompt())

    async def _next(self) -> TokenOut | None:
        # Shielded: a client disconnect must not cancel the pipeline's iterator mid-await (its cleanup
        # could then not publish the release); the cancellation lands at the next yield instead, and
        # the iterator is closed with aclose(). The pipeline never hangs, so this wait is bounded.
        with anyio.CancelScope(shield=True):
            token = await anext(self._tokens, None)
        await anyio.lowlevel.checkpoint()  # deliver a cancellation that arrived while shielded
        self._arrived(token)
        return token

    def _arrived(self, token: TokenOut | None) -> None:
        if token is not None:
            self._timer.token()

    def _step(self, token: TokenOut) -> Delta:
        """The stage decides ``finish`` (stop token, max_tokens, context); the gateway adds only
        stop strings, which it alone sees, and only once min_tokens allow a stop. A token's logprobs
        leave with the first delta that carries text from it (or with the last delta)."""
        self.completion_tokens += 1
        finish = token.finish
        if token.logprobs is not None:
            lp = token.logprobs
            self._logprobs.append(TokenLogprob(token.token, lp.logprob, lp.top, self._offset))
        text = self._detok.add(token.token)
        if finish is not None:
            text += self._detok.flush()
        self._offset += len(text)
        match = self._params.can_stop(self.completion_tokens)
        text, hit = self._stops.feed(text, final=finish is not None, match=match)
        finish = "stop" if hit else finish
        if not text and finish is None:
            return Delta(text, finish, (), self._index)
        return Delta(text, finish, self._take_logprobs(), self._index, self._take_prompt())

    def _take_logprobs(self) -> tuple[TokenLogprob, ...]:
        taken, self._logprobs = tuple(self._logprobs), []
        return taken

    def _take_prompt(self) -> tuple[TokenLogprob, ...]:
        if self._prompt_sent:
            return ()
        self._prompt_sent = True
        return self.prompt_logprobs

    async def close(self) -> None:
        """Close the pipeline iterator (idempotent, and not cancellable: the stages must hear it)."""
        if self._closed:
            return
        self._closed = True
        self._timer.end(self._finish)
        if self._deadline is not None:
            self._deadline.cancel()
        with anyio.CancelScope(shield=True):
            try:
                await self._tokens.aclose()
            except Exception:
                logger.exception("closing the pipeline stream of a request failed")


async def start_choices(pipeline: Pipeline, job: Job, tokenizer: PreTrainedTokenizerBase,
                        metrics: GatewayMetrics) -> list[Generation]:
    """Start every choice of ``job``: the first alone; the others once it has its first token (the
    prompt's full blocks are then cached on every stage its route took), all together."""
    generations = [await Generation.start(pipeline, job, 0, tokenizer, metrics)]
    try:
        shared = generations[0].prompt_logprobs
        others = (Generation.start(pipeline, job, i, tokenizer, metrics) for i in range(1, job.n))
        started = await asyncio.gather(*others, return_exceptions=True)
        generations += [g for g in started if isinstance(g, Generation)]
        for generation in generations[1:]:
            generation.share(shared)
        failed = [e for e in started if isinstance(e, BaseException)]
        if failed:
            raise failed[0]
    except BaseException:
        await close_all(generations)
        raise
    return generations


async def close_all(generations: Sequence[Generation]) -> None:
    for generation in generations:
        await generation.close()


_END = object()  # a choice's stream ended


async def merged(generations: Sequence[Generation]) -> AsyncIterator[Delta]:
    """The deltas of every choice as they come (each choice's in its order). The caller closes the
    generations (:func:`close_all`); a choice's error ends the whole stream."""
    if len(generations) == 1:
        async for delta in generations[0].deltas():
            yield delta
        return
    queue: asyncio.Queue[Delta | Exception | object] = asyncio.Queue()

    async def pump(generation: Generation) -> None:
        try:
            async for delta in generation.deltas():
                queue.put_nowait(delta)
            queue.put_nowait(_END)
        except Exception as exc:
            queue.put_nowait(exc)

    tasks = [asyncio.create_task(pump(g)) for g in generations]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is _END:
                running -= 1
            else:
                yield cast(Delta, item)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
