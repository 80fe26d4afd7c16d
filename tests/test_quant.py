"""GGUF-quantized matrices used in place (stages/quant.py), checked against gguf's own Python dequantizer.

Weights: random (seeded) float weights quantized with ``gguf.quants.quantize`` for the types it can write;
for Q4_K, Q5_K and Q6_K, which it cannot, random valid blocks (random quants and sub-block scales, f16
scales set to finite values). I = 7 blocks (224 or 1792 weights: not a multiple of the dot product's
vector width times its unroll) and O = 37 (odd, not a multiple of the thread split).
"""

from __future__ import annotations

import threading

import gguf
import numpy as np
import pytest
import torch

from bench.quant_kernels import random_blocks
from parallax.stages.kernels import MAX_ROWS
from parallax.stages.quant import QUANTIZABLE, TYPES, QuantMatrix

Q = gguf.GGMLQuantizationType
O = 37
U = 2.0**-24  # float32 unit roundoff
BF16_HALF_ULP = 2.0**-8  # relative rounding of a float32 value to bfloat16


def in_features(qtype: Q) -> int:
    return 7 * gguf.GGML_QUANT_SIZES[qtype][0]


def stored(qtype: Q, seed: int = 0) -> np.ndarray:
    """[O, bytes per row] blocks of a random weight."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(rng.standard_normal((O, in_features(qtype))).astype(np.float32), qtype)
    return random_blocks(qtype, O, in_features(qtype), rng)


def matrix(qtype: Q, seed: int = 0) -> QuantMatrix:
    return QuantMatrix(qtype, (O, in_features(qtype)), stored(qtype, seed))


def inputs(rows: int, features: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_within_float32_rounding(got: torch.Tensor, x: torch.Tensor, w: np.ndarray) -> None:
    """|got - x @ w.T| <= gamma_I * (|x| @ |w|.T), gamma_n = n u / (1 - n u): the worst-case error of a float32
    dot product of length n summed in any order (with or without fused multiply-adds), here against the
    float64 result of the exact float32 products. A bfloat16 result adds its own rounding, 2^-8 relative."""
    x64, w64 = x.double(), torch.from_numpy(w).double()
    want, scale = x64 @ w64.T, x64.abs() @ w64.abs().T
    n = w.shape[1]
    tol = n * U / (1 - n * U) * scale
    if got.dtype == torch.bfloat16:
        tol = tol * (1 + BF16_HALF_ULP) + BF16_HALF_ULP * want.abs()
    err = (got.double() - want).abs()
    assert got.shape == want.shape and bool((err <= tol).all()), f"max error {err.max():.3g}, bound {tol.min():.3g}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_rows_equals_gguf_bit_for_bit(qtype):
    m = matrix(qtype)
    want = gguf.quants.dequantize(m.blocks, qtype)
    got = m.dequantize_rows(0, O)
    assert got.dtype == torch.float32 and got.shape == (O, in_features(qtype))
    assert np.array_equal(got.numpy(), want)
    assert np.array_equal(m.dequantize_rows(5, 12).numpy(), want[5:12])
    assert m.dequantize_rows(3, 3).shape == (0, in_features(qtype))
    ids = torch.tensor([36, 0, 7, 7, 20])  # any rows, repeats allowed (an embedding's token ids)
    assert np.array_equal(m.take_rows(ids).numpy(), want[ids.numpy()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS, MAX_ROWS + 1, 64])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_is_x_times_the_dequantized_weight(qtype, rows, dtype):
    m = matrix(qtype, seed=rows)
    x = inputs(rows, in_features(qtype), dtype, seed=rows)
    got = m.matmul(x)
    assert got.dtype == dtype
    assert_within_float32_rounding(got, x, gguf.quants.dequantize(m.blocks, qtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_a_decode_row_does_not_depend_on_the_other_rows(qtype, dtype):
    """Up to MAX_ROWS rows: each row alone, in any smaller batch, or with other threads, bit for bit."""
    m = matrix(qtype)
    x = inputs(MAX_ROWS, in_features(qtype), dtype)
    together = m.matmul(x)
    alone = torch.cat([m.matmul(x[i : i + 1]) for i in range(MAX_ROWS)])
    assert torch.equal(together, alone)
    assert torch.equal(m.matmul(x[4:7]), together[4:7])
    assert m.matmul(x[:0]).shape == (0, O)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernel follows torch's thread count: one thread splits no rows
    try:
        assert torch.equal(m.matmul(x), together)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K], ids=lambda t: t.name)
def test_a_prefill_row_does_not_depend_on_the_other_rows_values(qtype):
    """Above MAX_ROWS the GEMM's summation order may depend on the number of rows (it is torch's), so
    prefill promises less than decode: same rows, same result; a row's result is independent of what the
    other rows hold; every row within float32 rounding of the exact product (the test above)."""
    m = matrix(qtype)
    x = inputs(40, in_features(qtype))
    first = m.matmul(x)
    assert torch.equal(m.matmul(x), first)
    other = x.clone()
    other[1:] = inputs(39, in_features(qtype), seed=1)
    assert torch.equal(m.matmul(other)[0], first[0])


def test_blocks_are_used_in_place_never_copied():
    blocks = stored(Q.Q4_0)
    m = QuantMatrix(Q.Q4_0, (O, in_features(Q.Q4_0)), blocks)
    assert m.blocks is blocks and np.shares_memory(m._kernel_blocks, blocks)
    assert blocks.flags.writeable  # the kernels' read-only view leaves the caller's array as it was
    assert m.nbytes == blocks.nbytes == O * 7 * 18


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q6_K], ids=lambda t: t.name)
def test_a_tensor_of_a_memory_mapped_gguf_file_is_used_in_place(tmp_path, qtype):
    blocks = stored(qtype)
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("blk.0.ffn_down.weight", blocks, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(path)  # mode "r": a read-only memory map
    m = QuantMatrix.from_reader_tensor(reader.tensors[0])
    assert m.qtype == qtype and m.shape == (O, in_features(qtype))
    assert np.shares_memory(m.blocks, reader.data) and np.shares_memory(m._kernel_blocks, reader.data)
    assert not m.blocks.flags.writeable
    x = inputs(2, in_features(qtype))
    assert torch.equal(m.matmul(x), QuantMatrix(qtype, m.shape, blocks).matmul(x))
    assert np.array_equal(m.dequantize_rows(0, O).numpy(), gguf.quants.dequantize(blocks, qtype))


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantize_float_weights_as_gguf_does(qtype):
    w = inputs(O, in_features(qtype), torch.bfloat16)
    m = QuantMatrix.quantize(w, qtype)
    assert m.qtype == qtype and m.shape == tuple(w.shape)
    assert np.array_equal(m.blocks, gguf.quants.quantize(w.float().numpy(), qtype))


def test_f16_scales_widen_exactly_for_every_bit_pattern():
    """Q8_0 blocks whose scale is each of the 65536 halves (zeros, subnormals, inf, nan) and whose
    quants are all 1: the decoded weights are the scales, exactly as numpy widens them."""
    blocks = np.ones((2048, 32, 34), np.uint8)
    blocks[:, :, :2] = np.arange(65536, dtype=np.uint16).view(np.uint8).reshape(2048, 32, 2)
    blocks = blocks.reshape(2048, 32 * 34)
    m = QuantMatrix(Q.Q8_0, (2048, 32 * 32), blocks)
    with np.errstate(invalid="ignore"):  # gguf multiplies the signalling nans
        want = gguf.quants.dequantize(blocks, Q.Q8_0)
    np.testing.assert_array_equal(m.dequantize_rows(0, 2048).numpy(), want)


def test_kernels_run_in_any_thread():
    m, x, got = matrix(Q.Q5_K), inputs(3, in_features(Q.Q5_K)), []
    t = threading.Thread(target=lambda: got.append(m.matmul(x)))
    t.start()
    t.join()
    assert torch.equal(got[0], m.matmul(x))


def test_bad_blocks_raise_a_clear_error():
    I = in_features(Q.Q4_0)
    good = stored(Q.Q4_0)
    cases = [
        (dict(qtype=Q.F16, shape=(O, I), blocks=good), "F16 is not supported"),
        (dict(qtype=Q.Q2_K, shape=(O, 256), blocks=good), "Q2_K is not supported"),
        (dict(qtype=Q.Q4_0, shape=(O, I + 16), blocks=good), "not a multiple of the Q4_0 block size 32"),
        (dict(qtype=Q.Q4_0, shape=(O + 1, I), blocks=good), r"needs uint8 blocks of shape \(38, 126\)"),
        (dict(qtype=Q.Q4_0, shape=(O, I), blocks=good[:, :-1]), r"got uint8 array \(37, 125\)"),
        (dict(qtype=Q.Q4_0, shape=(O, I), blocks=good.view(np.int8)), "needs uint8 blocks"),
        (dict(qtype=Q.Q4_0, shape=(O, I), blocks=good.tolist()), "got list"),
        (dict(qtype=Q.Q4_0, shape=(O, I, 1), blocks=good), "shape must be"),
        (dict(qtype=Q.Q4_0, shape=(0, I), blocks=good[:0]), "shape must be"),
        (dict(qtype=Q.Q4_0, shape=(O, I), blocks=np.zeros((O, 2 * 126), np.uint8)[:, ::2]), "C-contiguous"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            QuantMatrix(**kwargs)


def test_bad_calls_raise_a_clear_error():
    m = matrix(Q.Q8_0)
    I = in_features(Q.Q8_0)
    for x, message in [(torch.zeros(2, I + 1), rf"input must be \[rows, {I}\]"), (torch.zeros(I), "input must be"),
                       (torch.zeros(2, I, dtype=torch.float64), "float32, bfloat16 or float16"),
                       (torch.zeros(2, I, dtype=torch.int64), "float32, bfloat16 or float16")]:
        with pytest.raises(ValueError, match=message):
            m.matmul(x)
    for start, stop in [(-1, 2), (3, 2), (0, O + 1)]:
        with pytest.raises(ValueError, match="outside"):
            m.dequantize_rows(start, stop)
    for ids, message in [(torch.tensor([0, O]), "in 0:37"), (torch.tensor([-1]), "in 0:37"),
                         (torch.tensor([1.0]), "integer"), (torch.zeros(1, 1, dtype=torch.int64), "1-D")]:
        with pytest.raises(ValueError, match=message):
            m.take_rows(ids)
    with pytest.raises(ValueError, match="cannot quantize to Q4_K"):
        QuantMatrix.quantize(torch.zeros(2, 256), Q.Q4_K)
    with pytest.raises(ValueError, match="2-D"):
        QuantMatrix.quantize(torch.zeros(2, 2, 32), Q.Q8_0)
    with pytest.raises(ValueError, match="block size 32"):
        QuantMatrix.quantize(torch.zeros(2, 48), Q.Q8_0)


@pytest.mark.parametrize("name", ["numba", "numba-gemv", "torch-tile"])
def test_every_kernel_adds_the_bias_and_follows_the_dequantized_weight(name):
    bias = np.linspace(-3, 3, O).astype(np.float32)
    m = QuantMatrix.quantize(inputs(O, in_features(Q.Q8_0)), Q.Q8_0, bias)
    assert m.nbytes == m.blocks.nbytes + 4 * O
    x = inputs(5, in_features(Q.Q8_0), torch.bfloat16, seed=3).float()
    got = torch.from_numpy(m.run(name, x.numpy()))
    assert_within_float32_rounding(got - torch.from_numpy(bias), x, gguf.quants.dequantize(m.blocks, Q.Q8_0))
    assert torch.equal(m.matmul(x), torch.from_numpy(m.decode(x.numpy())))  # 5 rows: the decode pick
    with pytest.raises(ValueError, match=r"bias must have shape \(37,\)"):
        QuantMatrix.quantize(inputs(O, 32), Q.Q8_0, np.zeros(O + 1, np.float32))
    with pytest.raises(ValueError, match="no kernel 'torch' for a Q8_0 weight"):
        m.run("torch", x.numpy())
