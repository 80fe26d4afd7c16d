"""The numba bf16 kernel used for decode rows on CPU."""

import pytest
import torch
import torch.nn.functional as F

from parallax.stages import kernels
from parallax.stages.models.llama import Linear


@pytest.mark.parametrize("rows", [1, 3, kernels.MAX_ROWS])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_a_float32_reference(rows, bias):
    torch.manual_seed(rows)
    w = torch.randn(96, 200).to(torch.bfloat16)
    b = torch.randn(96).to(torch.bfloat16) if bias else None
    x = torch.randn(rows, 200).to(torch.bfloat16)
    got = kernels.linear_bf16(x, kernels.bits(w), b)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
    # the only difference allowed: summation order (float32) and the final rounding to bf16
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_a_row_does_not_depend_on_the_other_rows():
    torch.manual_seed(0)
    w = torch.randn(64, 576).to(torch.bfloat16)
    x = torch.randn(kernels.MAX_ROWS, 576).to(torch.bfloat16)
    together = kernels.linear_bf16(x, kernels.bits(w), None)
    alone = torch.cat([kernels.linear_bf16(x[i : i + 1], kernels.bits(w), None) for i in range(len(x))])
    assert torch.equal(together, alone)


def test_linear_routes_decode_rows_to_the_kernel_and_prefill_to_float32():
    torch.manual_seed(1)
    layer = Linear(32, 16, bias=False).to(torch.bfloat16)
    small, large = torch.randn(2, 32).to(torch.bfloat16), torch.randn(kernels.MAX_ROWS + 1, 32).to(torch.bfloat16)
    assert torch.equal(layer(small), kernels.linear_bf16(small, kernels.bits(layer.weight), None))
    assert torch.equal(layer(large), F.linear(large.float(), layer.weight.float()).to(torch.bfloat16))
    assert "_bits" in layer.__dict__ and "_fp32" in layer.__dict__
    assert [n for n, _ in layer.named_parameters()] == ["weight"]  # caches stay out of the state dict


def test_kernel_uses_torchs_thread_count_in_any_thread():
    import threading

    import numba

    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def run():
            kernels.linear_bf16(torch.ones(1, 8, dtype=torch.bfloat16), kernels.bits(torch.ones(4, 8, dtype=torch.bfloat16)), None)
            seen.append(numba.get_num_threads())

        t = threading.Thread(target=run)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(before)
    assert seen == [1]
