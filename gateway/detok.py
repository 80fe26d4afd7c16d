"""Text side of generation: incremental detokenization and stop strings.

``IncrementalDetokenizer`` turns generated token ids into text one token at a time. Byte-level BPE
tokens can hold part of a UTF-8 character, so a token's text is only emitted once it decodes to
complete characters. It decodes a small sliding window of tokens (the usual "prefix / read offset"
scheme of TGI and vLLM), so the cost per token does not grow with the length of the sequence.

Special tokens are dropped, but for the ids in ``keep``, written as their text: a tool request keeps
its format's markers (``[TOOL_CALLS]``, ``<|python_tag|>``, harmony's ``<|channel|>`` ...) so that
the tool parser sees them.

``StopStrings`` cuts the text at the first stop string and holds back text that could still turn
into one, so a stop string never reaches the client, not even in a stream.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from transformers import PreTrainedTokenizerBase

_PROMPT_CONTEXT = 5  # prompt tokens decoded with the first generated ones (leading spaces etc.)
_MAX_HELD = 8  # tokens of an incomplete character held back before giving up and emitting "\ufffd"
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int],
                 keep: Collection[int] = frozenset()) -> None:
        self._tokenizer = tokenizer
        self._keep = {token: str(tokenizer.convert_ids_to_tokens(token)) for token in keep}  # id -> its text
        self._special = frozenset(tokenizer.all_special_ids) - frozenset(keep)
        self._window: list[int] = list(prompt_ids[max(0, len(prompt_ids) - _PROMPT_CONTEXT) :])
        self._read = len(self._window)  # window[:read] has been emitted, window[read:] is held back
        self._prefix_text = self._decode(self._window)

    def add(self, token_id: int) -> str:
        """Add one generated token; return the text it completes ("" while a character is split)."""
        if token_id in self._special:
            return ""
        self._window.append(token_id)
        text = self._decode(self._window)
        held = len(self._window) - self._read
        if len(text) <= len(self._prefix_text) or (text.endswith(_REPLACEMENT) and held < _MAX_HELD):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Emit whatever is still held back (an incomplete character decodes to "\ufffd")."""
        if self._read == len(self._window):
            return ""
        text = self._decode(self._window)
        return self._advance(text) if len(text) > len(self._prefix_text) else ""

    def _advance(self, text: str) -> str:
        new = text[len(self._prefix_text) :]
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        return new

    def _decode(self, ids: list[int]) -> str:
        if not self._keep or self._keep.keys().isdisjoint(ids):
            return self._plain(ids)
        parts, run = [], []
        for token in ids:  # the runs between kept tokens decode on their own
            if token in self._keep:
                parts += [self._plain(run), self._keep[token]]
                run = []
            else:
                run.append(token)
        return "".join(parts) + self._plain(run)

    def _plain(self, ids: list[int]) -> str:
        text = self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return str(text)  # a flat list of ids decodes to one string


class StopStrings:
    """Finds stop strings in streamed text; ``feed`` returns the text that is safe to emit."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str, final: bool = False, match: bool = True) -> tuple[str, bool]:
        """Add text; return (text to emit, whether a stop string was hit).

        After a hit, everything from the stop string on is dropped and the caller should stop.
        ``final`` releases held-back text; ``match=False`` (e.g. before ``min_tokens``) passes
        text through without looking for stop strings.
        """
        buf = self._held + text
        self._held = ""
        if not match or not self._stops:
            return buf, False
        hit = self._first_hit(buf)
        if hit is not None:
            return buf[:hit], True
        keep = 0 if final else self._partial_len(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def _first_hit(self, buf: str) -> int | None:
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _partial_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
