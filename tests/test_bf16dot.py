"""bf16 weights times bf16 activations by AVX-512 BF16 dot products (``stages.bf16dot``), and bf16 and fp16 weights times float32
activations by AVX-512 fma in the same tiles: the product of the two as float32 sums, a row's bits independent of the
other rows and of the tile that computes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parallax.stages import bf16dot
from parallax.stages.kernels import Matrix

native = pytest.mark.skipif(not bf16dot.SUPPORTED, reason="no AVX-512 BF16 on this CPU")


def matrix(O: int, I: int, bias: bool = True) -> Matrix:
    g = torch.Generator().manual_seed(O)
    w = torch.randn(O, I, generator=g).mul(0.05).to(torch.bfloat16)
    return Matrix(w, torch.randn(O, generator=g).to(torch.bfloat16) if bias else None)


@native
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 16])
def test_it_computes_the_product_of_the_bf16_operands(rows):
    m = matrix(70, 96)  # 70 rows: not whole tiles of 4
    x = torch.randn(rows, 96).to(torch.bfloat16).float().numpy()
    want = x.astype(np.float64) @ m.weight.float().numpy().T.astype(np.float64) + m.bias.float().numpy()
    got = m.run(bf16dot.KERNEL, x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@native
def test_a_rows_bits_do_not_depend_on_the_other_rows_or_the_tile():
    m = matrix(64, 128, bias=False)
    x = torch.randn(16, 128).to(torch.bfloat16).float().numpy()
    full = m.run(bf16dot.KERNEL, x)  # 4 x 4 tiles
    for i in (0, 5, 15):
        assert np.array_equal(m.run(bf16dot.KERNEL, x[i:i + 1])[0], full[i])  # a 1 x 1 tile
    assert np.array_equal(m.run(bf16dot.KERNEL, x[:7]), full[:7])  # one 4-row tile and three single rows
    assert np.array_equal(m.run(bf16dot.KERNEL, x[::-1])[::-1], full)


@native
def test_offered_for_bf16_weights_and_activations_only():
    assert bf16dot.KERNEL in matrix(8, 64).candidates("decode", torch.bfloat16)
    assert bf16dot.KERNEL not in matrix(8, 64).candidates("decode", torch.float32)
    assert bf16dot.KERNEL not in matrix(8, 48).candidates("decode", torch.bfloat16)  # 48: not chunks of 32
    half = Matrix(torch.randn(8, 64).to(torch.float16), None)
    assert bf16dot.KERNEL not in half.candidates("prefill", torch.float16)


fma = pytest.mark.skipif(not bf16dot.FMA_SUPPORTED, reason="no AVX-512 on this CPU")
halves = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])


def half_matrix(O: int, I: int, dtype: torch.dtype, bias: bool = True) -> Matrix:
    g = torch.Generator().manual_seed(O)
    w = torch.randn(O, I, generator=g).mul(0.05).to(dtype)
    return Matrix(w, torch.randn(O, generator=g).to(dtype) if bias else None)


@fma
@halves
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 16])
def test_fma_computes_the_product_of_the_half_weight_and_float32_rows(rows, dtype):
    m = half_matrix(70, 96, dtype)  # 70 rows: not whole tiles of 4
    x = np.random.default_rng(rows).standard_normal((rows, 96), np.float32)
    want = x.astype(np.float64) @ m.weight.float().numpy().T.astype(np.float64) + m.bias.float().numpy()
    got = m.run(bf16dot.FMA_KERNEL, x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@fma
@halves
def test_fma_a_rows_bits_do_not_depend_on_the_other_rows_or_the_tile(dtype):
    m = half_matrix(66, 128, dtype, bias=False)  # 66: a last group of 2 weight rows
    x = np.random.default_rng(0).standard_normal((16, 128), np.float32)
    full = m.run(bf16dot.FMA_KERNEL, x)  # 4 x 4 tiles (and 1 x 4 for the last two weight rows)
    for i in (0, 5, 15):
        assert np.array_equal(m.run(bf16dot.FMA_KERNEL, x[i:i + 1])[0], full[i])  # 4 x 1 tiles (and 1 x 1)
    assert np.array_equal(m.run(bf16dot.FMA_KERNEL, x[:7]), full[:7])  # one 4-row tile and three single rows
    assert np.array_equal(m.run(bf16dot.FMA_KERNEL, x[::-1])[::-1], full)


@fma
def test_fma_offered_for_half_weights_of_whole_chunks():
    for dtype in (torch.bfloat16, torch.float16):
        assert bf16dot.FMA_KERNEL in half_matrix(8, 64, dtype).candidates("decode", dtype)
        assert bf16dot.FMA_KERNEL in half_matrix(8, 64, dtype).candidates("prefill", torch.float32)
        assert bf16dot.FMA_KERNEL not in half_matrix(8, 40, dtype).candidates("decode", dtype)  # 40: not chunks of 16
    assert bf16dot.FMA_KERNEL not in Matrix(torch.randn(8, 64), None).candidates("decode", torch.float32)
