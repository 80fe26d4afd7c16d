"""Incremental detokenizer and stop strings, with the real SmolLM2 (byte-level BPE) tokenizer."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from parallax.gateway.detok import IncrementalDetokenizer, StopStrings

MULTIBYTE = "héllo wörld 日本語 🎉"


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer) -> PreTrainedTokenizerBase:
    return smollm2_tokenizer


def stream(tokenizer: PreTrainedTokenizerBase, ids: list[int], prompt: list[int] | None = None) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt or [])
    pieces = [detok.add(t) for t in ids]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize(
    "text", [MULTIBYTE, "Hello, world! How are you?", "  spaces\n\nnew  lines\t", "🎉🎉 ünïcödé"]
)
@pytest.mark.slow  # needs the SmolLM2 conversion
def test_round_trip_token_by_token(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.slow  # needs the SmolLM2 conversion
def test_round_trip_after_a_prompt(tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say it"}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    assert "".join(stream(tokenizer, ids, prompt_ids)) == MULTIBYTE


@pytest.mark.slow  # needs the SmolLM2 conversion
def test_split_character_is_held_until_complete(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode(" 🎉", add_special_tokens=False)
    assert len(ids) > 1  # the emoji's bytes are spread over several byte-level tokens
    detok = IncrementalDetokenizer(tokenizer, [])
    pieces = [detok.add(t) for t in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1)
    assert pieces[-1] == " 🎉"
    assert detok.flush() == ""


@pytest.mark.slow  # needs the SmolLM2 conversion
def test_special_tokens_are_skipped(tokenizer: PreTrainedTokenizerBase) -> None:
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("Done.", add_special_tokens=False) + [eos]
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == "Done."
    assert pieces[-2] == ""


@pytest.mark.slow  # needs the SmolLM2 conversion
def test_incomplete_character_is_flushed_as_replacement(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("a🎉", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    text = "".join(detok.add(t) for t in ids[:-1])
    assert text == "a"
    assert detok.flush() == tokenizer.decode(ids[:-1])[1:]  # the dangling bytes, as U+FFFD
    assert detok.flush() == ""


@pytest.mark.slow  # needs the SmolLM2 conversion
def test_decode_window_stays_bounded(
    tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    decode = tokenizer.decode

    def counting_decode(ids: list[int], **kwargs: Any) -> Any:
        sizes.append(len(ids))
        return decode(ids, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", counting_decode)
    ids = tokenizer.encode((MULTIBYTE + " and some more words. ") * 40, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, list(range(100, 400)))
    out = "".join(detok.add(t) for t in ids) + detok.flush()
    assert len(ids) > 400
    assert max(sizes) <= 16
    assert out == decode(ids)


# -------------------------------------------------------------------------------- stop strings
def feed_all(stops: StopStrings, chunks: list[str]) -> tuple[str, bool]:
    out = []
    for i, chunk in enumerate(chunks):
        text, hit = stops.feed(chunk, final=i == len(chunks) - 1)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out), False


def test_stop_string_split_across_chunks() -> None:
    stops = StopStrings(["STOP"])
    assert stops.feed("Hello S") == ("Hello ", False)  # "S" could start "STOP": held back
    assert stops.feed("T") == ("", False)
    assert stops.feed("OP and more") == ("", True)


def test_held_text_released_when_it_is_not_a_stop() -> None:
    stops = StopStrings(["STOP"])
    assert stops.feed("a ST") == ("a ", False)
    assert stops.feed("ART") == ("START", False)
    assert stops.feed(" ST", final=True) == (" ST", False)


def test_earliest_of_several_stop_strings_wins() -> None:
    assert feed_all(StopStrings(["world", "lo"]), ["Hel", "lo wor", "ld"]) == ("Hel", True)
    assert feed_all(StopStrings(["\n\n", "###"]), ["a\n", "#", "##b"]) == ("a\n", True)


def test_no_stop_strings_pass_through() -> None:
    stops = StopStrings(["", ""])
    assert stops.feed("anything S") == ("anything S", False)


def test_matching_can_be_disabled() -> None:
    stops = StopStrings(["x"])
    assert stops.feed("axb", match=False) == ("axb", False)
    assert stops.feed("cxd") == ("c", True)
