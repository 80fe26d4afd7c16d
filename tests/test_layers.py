"""Layer allocation: every layer served exactly once, in order, contiguous and balanced."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parallax.broker.layers import even_split, format_layers, parse_layers


@st.composite
def layers_and_stages(draw):
    layers = draw(st.integers(min_value=1, max_value=512))
    return layers, draw(st.integers(min_value=1, max_value=layers))


@given(layers_and_stages())
def test_even_split_covers_every_layer_once_in_order(case):
    layers, stages = case
    ranges = even_split(layers, stages)
    assert len(ranges) == stages
    served = [layer for start, end in ranges for layer in range(start, end)]
    assert served == list(range(layers))
    assert ranges[0][0] == 0 and ranges[-1][1] == layers
    assert all(a_end == b_start for (_, a_end), (b_start, _) in zip(ranges, ranges[1:]))


@given(layers_and_stages())
def test_even_split_is_balanced_with_extras_first(case):
    layers, stages = case
    sizes = [end - start for start, end in even_split(layers, stages)]
    assert min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_even_split_examples():
    assert even_split(30, 2) == [(0, 15), (15, 30)]
    assert even_split(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert even_split(5, 5) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert even_split(7, 1) == [(0, 7)]


@pytest.mark.parametrize("layers, stages", [(6, 0), (6, -1), (6, 7), (0, 1)])
def test_even_split_rejects_impossible_splits(layers, stages):
    with pytest.raises(ValueError, match=r"at least 1 (stage|layer)|cannot split \d+ layers into \d+ stages"):
        even_split(layers, stages)


@given(st.integers(0, 10_000), st.integers(1, 10_000))
def test_parse_layers_round_trip(start, length):
    assert parse_layers(format_layers(start, start + length)) == (start, start + length)


@pytest.mark.parametrize("text, expected", [("0:15", (0, 15)), (" 3 : 7 ", (3, 7))])
def test_parse_layers(text, expected):
    assert parse_layers(text) == expected


@pytest.mark.parametrize("text", ["", "0", "0:", ":5", "a:b", "5:5", "7:3", "-1:3", "0:15:30", "0-15", None])
def test_parse_layers_rejects_bad_text(text):
    with pytest.raises(ValueError, match="layer range"):
        parse_layers(text)
