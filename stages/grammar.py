"""Structured output on the last stage: a token mask from the request's grammar (xgrammar).

xgrammar won on this CPU (SmolLM2's 49152-token vocabulary, ``python -m bench.structured masks``):
median 0.003 ms per token to fill the next-token bitmask and ~30 ms to compile a JSON schema;
llguidance 0.02 ms and ~17 ms; outlines-core 0.002 ms but ~900 ms to build its index per schema. The stage loads the tokenizer from the model folder on the first constrained request
(not at start: most stages never see one), compiles each grammar once (xgrammar's compiler caches
by text) and keeps one matcher per request in its :class:`Constraint`. The matcher advances with
every sampled token; a resumed request replays its tokens so far (``Grammar.replay``) into a fresh one.

The sampler masks only the rows whose spec carries a mask (:func:`apply_masks`): unconstrained rows
of the same batch pay nothing. Stop tokens are allowed only where the grammar may end, and a request
ends (``stop``) as soon as its grammar is complete and allows nothing more but a stop token.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from parallax.broker.errors import GrammarError
from parallax.broker.wire import Grammar, SamplingParams

if TYPE_CHECKING:  # xgrammar takes ~2 s to import: only a stage that gets a constrained request loads it
    import xgrammar as xgr

_CACHE_BYTES = 256 << 20  # compiled grammars kept by xgrammar's compiler (LRU by text)
# JSON without free whitespace: a model cannot spend its tokens on blanks, and the text is what json.dumps writes
_JSON = dict(any_whitespace=False, separators=(", ", ": "))


class Grammars:
    """Compiles the grammars of one model's tokenizer (loaded on first use), cached by text."""

    def __init__(self, tokenizer_path: Path | str, vocab_size: int) -> None:
        self._path, self.vocab_size = Path(tokenizer_path), vocab_size
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()

    def constraint(self, params: SamplingParams, replay: Sequence[int] = ()) -> Constraint:
        """A fresh matcher for ``params.grammar``, advanced over ``replay`` (the tokens generated
        before a resubmission). Raises :class:`GrammarError` for a grammar that does not compile."""
        grammar = params.grammar
        assert grammar is not None
        try:
            compiled = self._compile(grammar)
        except (RuntimeError, ValueError) as exc:
            raise GrammarError(f"cannot compile the {grammar.kind} grammar: {' '.join(str(exc).split())[:300]}") from None
        import xgrammar as xgr

        stops = list(params.stop_token_ids) or None
        constraint = Constraint(xgr.GrammarMatcher(compiled, override_stop_tokens=stops), self.vocab_size, stops or [])
        for token in replay:
            constraint.accept(token)
        return constraint

    def _compile(self, grammar: Grammar) -> "xgr.CompiledGrammar":
        compiler = self._load()
        if grammar.kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', **_JSON)
        if grammar.kind == "json_schema":
            return compiler.compile_json_schema(grammar.spec, **_JSON)
        if grammar.kind == "regex":
            return compiler.compile_regex(grammar.spec)
        return compiler.compile_grammar(grammar.spec)

    def _load(self) -> "xgr.GrammarCompiler":
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(self._path)
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=_CACHE_BYTES)
            return self._compiler


class Constraint:
    """One request's matcher and the bitmask of the token it may sample next."""

    def __init__(self, matcher: "xgr.GrammarMatcher", vocab_size: int, stop_token_ids: list[int]) -> None:
        self._matcher, self._vocab = matcher, vocab_size
        self._stops = np.asarray(stop_token_ids, dtype=np.int64)
        self._bitmask = torch.full((1, (vocab_size + 31) // 32), -1, dtype=torch.int32)  # [1, ceil(V / 32)] bits
        self.allowed = torch.ones(vocab_size, dtype=torch.bool)  # [V]: the tokens it may sample next
        self.complete = False
        self._refresh()

    def accept(self, token: int) -> None:
        """Advance over a sampled token; raises :class:`GrammarError` if the grammar forbids it."""
        if not self._matcher.accept_token(token):
            raise GrammarError(f"token {token} does not fit the request's grammar")
        self._refresh()

    def _refresh(self) -> None:
        """The next bitmask; ``complete`` once nothing but a stop token (or nothing) may follow."""
        if self._matcher.is_terminated():
            self.complete = True
            return
        self._matcher.fill_next_token_bitmask(self._bitmask)
        bits = np.unpackbits(self._bitmask[0].numpy().view(np.uint8), bitorder="little")[: self._vocab]
        self.allowed = torch.from_numpy(bits.view(np.bool_))
        stops = self._stops[self._stops < self._vocab]
        self.complete = int(bits.sum()) == int(bits[stops].sum())


def apply_masks(logits: torch.Tensor, masks: Sequence[Constraint | None]) -> torch.Tensor:
    """``logits`` [S, V], in place, with every token its row's constraint forbids at -inf (rows
    without one untouched). Inference mode: the backend's logits are inference tensors."""
    with torch.inference_mode():
        for row, constraint in enumerate(masks):
            if constraint is not None:
                logits[row].masked_fill_(~constraint.allowed, float("-inf"))
    return logits
