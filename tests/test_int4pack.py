"""Q4_0/Q4_1 blocks held in torch's int4 layout (``stages.int4pack``): the nibbles move as they are, the
scales round to bf16, the kernel computes x times exactly that weight, and a weight is held in one layout."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from bench.quant_kernels import random_blocks
from parallax.stages import int4pack, tuning
from parallax.stages.int4pack import Int4Pack
from parallax.stages.quant import QuantMatrix

Q = gguf.GGMLQuantizationType
SHAPES = [(64, 256), (192, 512)]


def quantized(qtype: Q, O: int, I: int, seed: int = 0) -> QuantMatrix:
    rng, bias = np.random.default_rng(seed), np.arange(O, dtype=np.float32) / O
    if qtype == Q.Q4_K:  # gguf cannot write K-quants: random valid blocks
        return QuantMatrix(qtype, (O, I), random_blocks(qtype, O, I, rng), bias)
    return QuantMatrix.quantize(rng.standard_normal((O, I), dtype=np.float32), qtype, bias=bias)


def bf16_scaled(m: QuantMatrix) -> np.ndarray:
    """The weight the int4 layout holds, from gguf's own dequantization: w = (q - 8) * bf16(d) + bf16(zero)."""
    O, I = m.shape
    if m.qtype == Q.Q4_K:
        return bf16_scaled_q4_k(m)
    groups = m.blocks.reshape(O, I // 32, -1)
    d = groups[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    m_ = groups[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32) if m.qtype == Q.Q4_1 else 0 * d
    exact = gguf.quants.dequantize(m.blocks, m.qtype).reshape(O, I // 32, 32)  # d * q (+ m), q - 8 for Q4_0
    q = np.rint((exact - m_[:, :, None]) / np.where(d == 0, 1, d)[:, :, None]) + (0 if m.qtype == Q.Q4_1 else 8)
    zero = m_ + 8 * d if m.qtype == Q.Q4_1 else 0 * d
    to_bf16 = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16).float().numpy()  # noqa: E731
    return ((q - 8) * to_bf16(d)[:, :, None] + to_bf16(zero)[:, :, None]).reshape(O, I).astype(np.float32)


def bf16_scaled_q4_k(m: QuantMatrix) -> np.ndarray:
    """Q4_K decoded block by block as ggml's C code does (get_scale_min_k4), checked against gguf's
    dequantization, then with scale = d * sc and zero = 8 d sc - dmin m rounded to bf16."""
    O, I = m.shape
    to_bf16 = lambda a: float(torch.tensor(a, dtype=torch.float32).to(torch.bfloat16).float())  # noqa: E731
    exact, held = np.empty((O, I), np.float32), np.empty((O, I), np.float32)
    for o in range(O):
        for blk in range(I // 256):
            b = m.blocks[o, blk * 144:(blk + 1) * 144]
            d, dmin = (np.float32(b[i:i + 2].view(np.float16)[0]) for i in (0, 2))
            s = [int(v) for v in b[4:16]]
            for j in range(8):
                sc, mn = (s[j] & 63, s[j + 4] & 63) if j < 4 else \
                    ((s[j + 4] & 15) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
                chunk = b[16 + 32 * (j // 2):16 + 32 * (j // 2) + 32]
                q = (chunk & 15) if j % 2 == 0 else (chunk >> 4)
                scale, minimum = np.float32(d * np.float32(sc)), np.float32(dmin * np.float32(mn))
                cols = slice(blk * 256 + 32 * j, blk * 256 + 32 * j + 32)
                exact[o, cols] = scale * q.astype(np.float32) - minimum
                held[o, cols] = (q.astype(np.float32) - 8) * to_bf16(scale) + to_bf16(8 * scale - minimum)
    np.testing.assert_array_equal(exact, gguf.quants.dequantize(m.blocks, Q.Q4_K))  # the decoding above is right
    return held


@pytest.mark.parametrize("qtype", int4pack.FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_the_repacked_weight_is_the_blocks_with_bf16_scales(qtype, shape):
    m = quantized(qtype, *shape)
    packed = Int4Pack.from_blocks(qtype, m.blocks)
    np.testing.assert_array_equal(packed.rows(np.arange(shape[0])), bf16_scaled(m))
    assert packed.nbytes == shape[0] * shape[1] * 20 // 32  # 16 bytes of nibbles + bf16 scale and zero per 32
    rows = np.array([shape[0] - 1, 0, 33, 33])  # any order, repeats
    np.testing.assert_array_equal(packed.rows(rows), packed.rows(np.arange(shape[0]))[rows])


@pytest.mark.parametrize("qtype", int4pack.FORMATS)
def test_repacking_a_chunk_of_rows_at_a_time_gives_the_same_layout(qtype):
    m = quantized(qtype, 320, 256)
    whole, chunked = Int4Pack.from_blocks(qtype, m.blocks, 1 << 20), Int4Pack.from_blocks(qtype, m.blocks, 64)
    assert torch.equal(whole.packed, chunked.packed) and torch.equal(whole.scales_zeros, chunked.scales_zeros)


@pytest.mark.parametrize("qtype", int4pack.FORMATS)
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_the_kernel_multiplies_by_the_repacked_weight(qtype, rows):
    m = quantized(qtype, 192, 512)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    want = x.double() @ torch.from_numpy(bf16_scaled(m)).double().T + torch.from_numpy(m._bias32).double()
    got = torch.from_numpy(m.run(int4pack.KERNEL, x.float().numpy())).double()
    assert (got - want).abs().max() <= 2 ** -7 * want.abs().max()  # the kernel's bf16 output, rounded


def test_only_bf16_activations_and_whole_row_blocks_are_offered_the_int4_kernel():
    assert int4pack.KERNEL in quantized(Q.Q4_1, 64, 32).candidates("decode", torch.bfloat16)
    assert int4pack.KERNEL not in quantized(Q.Q4_1, 64, 32).candidates("decode", torch.float32)  # float32 stays exact
    assert int4pack.KERNEL not in quantized(Q.Q4_0, 96, 32).candidates("decode", torch.bfloat16)  # 96 rows: not 64s
    assert int4pack.KERNEL not in quantized(Q.Q8_0, 64, 32).candidates("prefill", torch.bfloat16)
    with pytest.raises(ValueError, match="cannot be held as int4"):
        Int4Pack.from_blocks(Q.Q8_0, quantized(Q.Q8_0, 64, 32).blocks)


def test_settling_on_the_int4_kernel_drops_the_blocks_and_keeps_serving_rows():
    m = quantized(Q.Q4_0, 128, 64)
    ids = torch.tensor([5, 127, 64])
    before = m.take_rows(ids)
    m.picks.update(decode=int4pack.KERNEL, prefill=int4pack.KERNEL)
    m.settle()
    assert m.repacked and m.blocks.size == 0 and m.nbytes == 128 * 64 * 20 // 32 + 128 * 4  # + the float32 bias
    assert m.candidates("decode", torch.bfloat16) == (int4pack.KERNEL,)
    assert (m.take_rows(ids) - before).abs().max() <= 2 ** -8 * before.abs().max()  # bf16 scales
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert m.matmul(x).shape == (3, 128)


def test_one_layout_for_both_row_kinds():
    m = quantized(Q.Q4_1, 64, 32)
    m.picks.update(decode=int4pack.KERNEL, prefill="numba")
    with pytest.raises(ValueError, match="every row kind must use it"):
        m.settle()
    other = quantized(Q.Q4_1, 64, 32)
    other.run(int4pack.KERNEL, np.zeros((1, 32), np.float32))  # measured: an int4 copy made for the timing
    other.settle()  # picks stayed on the block kernels: the copy goes, the blocks stay
    assert not other.repacked and other.nbytes == other.blocks.nbytes + 64 * 4


def test_tuning_picks_one_layout_for_both_row_kinds(tmp_path, monkeypatch):
    monkeypatch.setenv("PARALLAX_CACHE", str(tmp_path))
    ms = [quantized(Q.Q4_1, 576, 576, seed) for seed in range(2)]
    picks = tuning.tune(ms, torch.bfloat16)
    decode, prefill = picks["576x576 Q4_1 decode"], picks["576x576 Q4_1 prefill"]
    assert (decode in tuning.OWN_LAYOUT) == (prefill in tuning.OWN_LAYOUT) and (decode in tuning.OWN_LAYOUT) <= (prefill == decode)
    assert all(m.repacked == (decode in tuning.OWN_LAYOUT) for m in ms)
    cached = [quantized(Q.Q4_1, 576, 576, 7)]
    assert tuning.tune(cached, torch.bfloat16) == picks and cached[0].repacked == ms[0].repacked  # from the cache
