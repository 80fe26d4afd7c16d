"""The bf16 CPU kernels: projections for generated tokens and prompt rows, the fused layer."""

import subprocess
import sys

import numpy as np
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
    got = kernels.linear_bf16(x, kernels.Matrix(w, b))
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
    # the only difference allowed: summation order (float32) and the final rounding to bf16
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_a_row_does_not_depend_on_the_other_rows():
    torch.manual_seed(0)
    w = torch.randn(64, 576).to(torch.bfloat16)
    x = torch.randn(3 * kernels.MAX_ROWS, 576).to(torch.bfloat16)
    together = kernels.linear_bf16(x, kernels.Matrix(w, None))
    alone = torch.cat([kernels.linear_bf16(x[i : i + 1], kernels.Matrix(w, None)) for i in range(len(x))])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("shape", [(960, 576), (576, 576), (3072, 576), (576, 1536), (96, 202)])
def test_a_prompt_row_does_not_depend_on_the_other_rows(shape):
    """The GEMM of prompt rows (SmolLM2's shapes; one with I % 4 != 0): each of 37 rows computed among
    all of them equals it computed alone, at every place of a block of four, among other counts of
    rows, in another order, and on one thread (MKL's sgemm does not keep any of these)."""
    torch.manual_seed(1)
    out_features, in_features = shape
    m = kernels.Matrix(torch.randn(out_features, in_features).to(torch.bfloat16), torch.randn(out_features).to(torch.bfloat16))
    x = torch.randn(37, in_features).to(torch.bfloat16).float().numpy()
    together = kernels._gemm(x, m)
    want = F.linear(torch.from_numpy(x), *m.fp32).numpy()
    assert together.shape == want.shape and np.abs(together - want).max() <= 0.01 * np.abs(want).max()
    assert np.array_equal(together, torch.from_numpy(together).to(torch.bfloat16).float().numpy())  # bf16 values
    for i in range(len(x)):
        for place in range(4):
            rows = np.zeros((place + 1, in_features), np.float32)
            rows[place] = x[i]
            assert np.array_equal(kernels._gemm(rows, m)[place], together[i]), (i, place)
    for count in (2, 7, 17):
        assert np.array_equal(kernels._gemm(x[:count], m), together[:count])
    assert np.array_equal(kernels._gemm(x[::-1].copy(), m), together[::-1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert np.array_equal(kernels._gemm(x, m), together)
    finally:
        torch.set_num_threads(threads)


def test_linear_routes_decode_rows_to_the_kernel_and_prefill_to_float32():
    torch.manual_seed(1)
    layer = Linear(32, 16, bias=False).to(torch.bfloat16)
    small, large = torch.randn(2, 32).to(torch.bfloat16), torch.randn(kernels.MAX_ROWS + 1, 32).to(torch.bfloat16)
    assert torch.equal(layer(small), kernels.linear_bf16(small, kernels.Matrix(layer.weight, None)))
    assert torch.equal(layer(large), F.linear(large.float(), layer.weight.float()).to(torch.bfloat16))
    assert {"bits", "fp32"} <= set(layer.matrix().__dict__)  # both made once, then kept
    assert [n for n, _ in layer.named_parameters()] == ["weight"]  # caches stay out of the state dict


def test_kernel_uses_torchs_thread_count_in_any_thread():
    import threading

    import numba

    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def run():
            ones = torch.ones(4, 8, dtype=torch.bfloat16)
            kernels.linear_bf16(ones[:1], kernels.Matrix(ones, None))
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


@pytest.mark.parametrize("stage", [(1, 3), (2, 4)], ids=["middle", "last"])
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_fused_layers_compute_what_the_torch_layers_compute(bf16_models, name, stage, monkeypatch):
    """bf16: the prompts of 3 requests (blocks in any order), then one decode step of the 3, through
    the fused path (numba layers; prompt rows by the tiled GEMM) and through the torch layers. Both
    round to bf16 after every op; only float32 summation order and cos/exp differ, so hidden states
    (logits on the last stage) and cached keys/values agree to a few bf16 ulps."""
    import json

    from parallax.stages.kv import KVPool, Rows
    from parallax.stages.models.llama import StageModel
    from parallax.stages.torch_backend import load_stage_model

    path = bf16_models[name]
    model = load_stage_model(path, json.loads((path / "config.json").read_text()), *stage, torch.bfloat16, torch.device("cpu"))
    assert model.fused and not model.first and model.last == (stage[1] == 4)
    pool = KVPool(len(model.layers), model.args.kv_heads, model.args.dim_head, 16, 4, torch.bfloat16, torch.device("cpu"))
    tables = [[9, 2, 7], [5, 0], [11, 3, 14, 1]]
    lengths = [9, 5, 14]  # prompt lengths
    torch.manual_seed(3)

    def both_paths(x, rows):
        saved = pool.k.clone(), pool.v.clone()
        with torch.inference_mode():
            fused = model(x, rows, pool)
            fused_kv = pool.k.clone(), pool.v.clone()
            pool.k.copy_(saved[0]), pool.v.copy_(saved[1])
            with monkeypatch.context() as patch:
                patch.setattr(StageModel, "fused", property(lambda self: False))
                reference = model(x, rows, pool)
        assert fused.dtype == torch.bfloat16 and fused.shape == reference.shape
        # a few bf16 ulps of the largest value (a wrong head, RoPE or mask is off by the values themselves);
        # logits a few more: the final norm and lm_head amplify a 2-ulp difference of a hidden state
        pairs = ((fused, reference, 0.05 if model.last else 0.02), (fused_kv[0], pool.k, 0.02), (fused_kv[1], pool.v, 0.02))
        for got, want, tol in pairs:
            assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()
        assert not torch.equal(fused_kv[0], saved[0])  # the new keys did land in the pool

    prompts = Rows.build([(t, 0, n, True) for t, n in zip(tables, lengths)], 4, torch.device("cpu"), prompt=True)
    both_paths(torch.randn(sum(lengths), model.args.hidden_size).to(torch.bfloat16), prompts)
    decode = Rows.build([(t, n, 1, True) for t, n in zip(tables, lengths)], 4, torch.device("cpu"))
    both_paths(torch.randn(3, model.args.hidden_size).to(torch.bfloat16), decode)


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
        return StepItem(rid, pos, len(ids), data, "int32", greedy, tables[rid], prompt=pos < len(prompts[rid]))

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


def test_warm_up_keeps_torch_thread_count():
    """`parallax-stage --threads 1` must stay at one thread: numba's pool starting in warm_up reset it."""
    code = ("import torch; torch.set_num_threads(1)\n"
            "from parallax.stages import kernels\n"
            "kernels.warm_up(); print(torch.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "1"
