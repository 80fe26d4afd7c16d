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
    got = kernels.linear_bf16(x, *kernels.matrix(w, b))
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
    # the only difference allowed: summation order (float32) and the final rounding to bf16
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_a_row_does_not_depend_on_the_other_rows():
    torch.manual_seed(0)
    w = torch.randn(64, 576).to(torch.bfloat16)
    x = torch.randn(kernels.MAX_ROWS, 576).to(torch.bfloat16)
    together = kernels.linear_bf16(x, *kernels.matrix(w, None))
    alone = torch.cat([kernels.linear_bf16(x[i : i + 1], *kernels.matrix(w, None)) for i in range(len(x))])
    assert torch.equal(together, alone)


def test_linear_routes_decode_rows_to_the_kernel_and_prefill_to_float32():
    torch.manual_seed(1)
    layer = Linear(32, 16, bias=False).to(torch.bfloat16)
    small, large = torch.randn(2, 32).to(torch.bfloat16), torch.randn(kernels.MAX_ROWS + 1, 32).to(torch.bfloat16)
    assert torch.equal(layer(small), kernels.linear_bf16(small, *kernels.matrix(layer.weight, None)))
    assert torch.equal(layer(large), F.linear(large.float(), layer.weight.float()).to(torch.bfloat16))
    assert "_arrays" in layer.__dict__ and "_fp32" in layer.__dict__
    assert [n for n, _ in layer.named_parameters()] == ["weight"]  # caches stay out of the state dict


def test_kernel_uses_torchs_thread_count_in_any_thread():
    import threading

    import numba

    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def run():
            kernels.linear_bf16(torch.ones(1, 8, dtype=torch.bfloat16), *kernels.matrix(torch.ones(4, 8, dtype=torch.bfloat16), None))
            seen.append(numba.get_num_threads())

        t = threading.Thread(target=run)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(before)
    assert seen == [1]


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory):
    from tests.cluster import make_tiny_model

    root = tmp_path_factory.mktemp("bf16-models")
    return {"llama": make_tiny_model(root / "llama", "llama", layers=4),
            "qwen2": make_tiny_model(root / "qwen2", "qwen2", layers=4)}  # q/k/v biases


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_fused_decode_layer_computes_what_the_torch_layers_compute(bf16_models, name, monkeypatch):
    """A bf16 decode step of 3 requests of different lengths (blocks in any order): the one-call-per-layer
    kernel against the torch layers. Both round to bf16 after every op; only float32 summation order
    differs, so hidden states and cached keys/values agree to a few bf16 ulps."""
    import json

    from parallax.stages.kv import KVPool, Rows
    from parallax.stages.models.llama import StageModel
    from parallax.stages.torch_backend import load_stage_model

    path = bf16_models[name]
    model = load_stage_model(path, json.loads((path / "config.json").read_text()), 1, 3, torch.bfloat16, torch.device("cpu"))
    assert not model.first and not model.last  # a middle stage: hidden states in and out
    pool = KVPool(len(model.layers), model.args.kv_heads, model.args.dim_head, 16, 4, torch.bfloat16, torch.device("cpu"))
    tables = [[9, 2, 7], [5, 0], [11, 3, 14, 1]]
    lengths = [9, 5, 14]  # positions already cached per request
    torch.manual_seed(3)
    for table, n in zip(tables, lengths):  # prefill each request (torch path)
        rows = Rows.build([(table, 0, n, False)], 4, torch.device("cpu"))
        with torch.inference_mode():
            model(torch.randn(n, model.args.hidden_size).to(torch.bfloat16), rows, pool)
    x = torch.randn(3, model.args.hidden_size).to(torch.bfloat16)
    rows = Rows.build([(t, n, 1, False) for t, n in zip(tables, lengths)], 4, torch.device("cpu"))
    saved = pool.k.clone(), pool.v.clone()
    assert model._fused_decode(x, rows)
    with torch.inference_mode():
        fused = model(x, rows, pool)
        fused_kv = pool.k.clone(), pool.v.clone()
        pool.k.copy_(saved[0]), pool.v.copy_(saved[1])
        monkeypatch.setattr(StageModel, "_fused_decode", lambda *a: False)
        reference = model(x, rows, pool)
    assert fused.dtype == torch.bfloat16 and fused.shape == reference.shape == (3, model.args.hidden_size)
    # a few bf16 ulps of the largest value (a wrong head, RoPE or mask is off by the values themselves)
    for got, want in ((fused, reference), (fused_kv[0], pool.k), (fused_kv[1], pool.v)):
        assert (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()
    assert not torch.equal(fused_kv[0], saved[0])  # the new keys did land in the pool


@pytest.mark.slow
def test_bf16_decode_does_not_depend_on_the_batch(smollm2_path):
    """SmolLM2 in bf16 through the backend: request A's greedy tokens decoding alone equal its tokens
    while B decodes beside it and C's prompt is prefilled in the same steps (a mixed step runs the
    decode rows through the fused kernel apart from the prefill)."""
    from parallax.broker.wire import SamplingParams
    from parallax.stages.backend import SampleSpec, StepItem
    from parallax.stages.torch_backend import TorchBackend

    backend = TorchBackend.load(smollm2_path, "smollm2-135m", 0, 30, "bfloat16", "cpu")
    backend.init_kv(24, 16)
    assert backend.model.decode_group == kernels.MAX_ROWS
    greedy = SampleSpec(SamplingParams(temperature=0.0, max_tokens=64), (), 0)
    prompts = {"a": [1, 4093, 314, 260, 3575, 282, 4649, 47], "b": [1, 504, 3575, 30], "c": list(range(100, 140))}
    tables = {"a": tuple(range(0, 4)), "b": tuple(range(4, 8)), "c": tuple(range(8, 12))}

    def item(rid, ids, pos):
        data = memoryview(torch.tensor(ids, dtype=torch.int32).numpy().tobytes())
        return StepItem(rid, pos, len(ids), data, "int32", greedy, tables[rid])

    def decode(rids, steps, join_at=None):
        pos = {r: len(prompts[r]) for r in rids}
        last = dict(zip(rids, backend.run([item(r, prompts[r], 0) for r in rids]).tokens))
        out = {r: [last[r]] for r in rids}
        for step in range(steps):
            batch = [item(r, [last[r]], pos[r]) for r in rids]
            if step == join_at:
                batch.append(item("c", prompts["c"], 0))  # a prefill chunk in the same step
            tokens = backend.run(batch).tokens
            for r, t in zip(rids, tokens):
                out[r].append(t)
                last[r], pos[r] = t, pos[r] + 1
        return out

    alone = decode(["a"], 16)["a"]
    together = decode(["a", "b"], 16, join_at=5)
    assert together["a"] == alone
    assert len(set(alone)) > 3  # it is generating text, not repeating one token
