"""A fixed, seeded prompt set: random sentences from a word list, cut to an exact token count.

Prompts are sent as token ids, so every request has exactly the planned prompt length and a shared
prefix stays shared token for token (no re-tokenization at the boundary).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Encode = Callable[[str], list[int]]

WORDS = ["the", "of", "and", "to", "in", "is", "that", "it", "was", "for", "on", "are", "as", "with", "his", "they", "at", "be", "this", "from", "have", "or", "by", "one", "had", "not", "but", "what", "all", "were", "when", "we", "there", "can", "an", "your", "which", "their", "said", "if", "do", "will", "each", "about", "how", "up", "out", "them", "then", "she", "many", "some", "so", "these", "would", "other", "into", "has", "more", "her", "two", "like", "him", "see", "time", "could", "no", "make", "than", "first", "been", "its", "who", "now", "people", "my", "made", "over", "did", "down", "only", "way", "find", "use", "may", "water", "long", "little", "very", "after", "words", "called", "just", "where", "most", "know", "get", "through", "back", "much", "before", "go", "good", "new", "write", "our", "used", "me", "man", "too", "any", "day", "same", "right", "look", "think", "also", "around", "another", "came", "come", "work", "three", "word", "must", "because", "does", "part", "even", "place", "well", "such", "here", "take", "why", "things", "help", "put", "years", "different", "away", "again", "off", "went", "old", "number", "great", "tell", "men", "say", "small", "every", "found", "still", "between", "name", "should", "home", "big", "give", "air", "line", "set", "own", "under", "read", "last", "never", "us", "left", "end", "along", "while", "might", "next", "sound", "below", "saw", "something", "thought", "both", "few", "those", "always", "looked", "show", "large", "often", "together", "asked", "house", "world", "going", "want", "school", "important", "until", "form", "food", "keep", "children", "feet", "land", "side", "without", "boy", "once", "animals", "life", "enough", "took", "sometimes", "four", "head", "above", "kind", "began", "almost", "live", "page", "got", "earth", "need", "far", "hand", "high", "year", "mother", "light", "parts", "country", "father", "let", "night", "following", "picture", "being", "study", "second", "eyes", "soon", "times", "story", "boys", "since", "white", "days", "ever", "paper", "hard", "near", "sentence", "better", "best", "across", "during", "today", "others", "sure", "means", "knew", "river", "mountain", "city", "garden", "winter", "summer", "morning", "evening", "window", "engine", "music", "market", "bridge", "forest", "ocean", "island", "village", "letter", "number", "machine", "language", "science", "history", "question", "answer", "problem", "reason"]


def sentence(rng: random.Random, min_words: int = 6, max_words: int = 16) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
    return " ".join(words).capitalize() + "."


def token_prompt(rng: random.Random, encode: Encode, length: int) -> list[int]:
    """Exactly ``length`` token ids: random sentences, each encoded with a leading space, then cut."""
    if length < 1:
        raise ValueError(f"a prompt needs at least one token, got {length}")
    ids: list[int] = []
    while len(ids) < length:
        ids.extend(encode(" " + sentence(rng)))
    return ids[:length]


@dataclass(frozen=True)
class PromptSet:
    """Every prompt of one benchmark run, all distinct, all derived from one seed."""

    warmup: list[list[int]]
    levels: list[list[list[int]]]  # one list of prompts per concurrency level
    prefix: list[int]
    suffix_a: list[int]
    suffix_b: list[int]
    memory: list[list[int]]


def build_prompts(
    encode: Encode,
    seed: int,
    input_len: int,
    level_requests: Sequence[int],
    prefix_len: int = 1000,
    suffix_len: int = 16,
    memory_requests: int = 64,
    memory_len: int = 1000,
    warmup_requests: int = 2,
) -> PromptSet:
    """Deterministic for a given seed, encoder and sizes (one ``random.Random(seed)`` stream)."""
    rng = random.Random(seed)

    def many(count: int, length: int) -> list[list[int]]:
        return [token_prompt(rng, encode, length) for _ in range(count)]

    return PromptSet(
        warmup=many(warmup_requests, input_len),
        levels=[many(count, input_len) for count in level_requests],
        prefix=token_prompt(rng, encode, prefix_len) if prefix_len else [],
        suffix_a=token_prompt(rng, encode, suffix_len) if prefix_len else [],
        suffix_b=token_prompt(rng, encode, suffix_len) if prefix_len else [],
        memory=many(memory_requests, memory_len),
    )


def tokenizer_encoder(model_path: str) -> Encode:
    """The model's tokenizer as a plain ``str -> ids`` function (no special tokens added)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    return encode
