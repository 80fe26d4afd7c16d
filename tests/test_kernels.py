"""The bf16 CPU kernels: projections for generated tokens and prompt rows, the fused layer."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parallax.stages import bf16dot, kernels, quant


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


def prompt_rows(x: np.ndarray, m: kernels.Projection) -> np.ndarray:
    out = m.prefill(x)  # the fused path's prompt projection: prefill, rounded to bf16
    kernels._round_rows(out)
    return out


@pytest.mark.parametrize("shape", [(960, 576), (576, 576), (3072, 576), (576, 1536), (96, 202)])
def test_a_prompt_row_does_not_depend_on_the_other_rows(shape):
    """The tile kernel on prompt rows (SmolLM2's shapes; one with I % 4 != 0): each of 37 rows computed among
    all of them equals it computed alone, at every place of a tile of four, among other counts of rows,
    in another order, and on one thread (MKL's sgemm does not keep any of these)."""
    torch.manual_seed(1)
    out_features, in_features = shape
    w, b = torch.randn(out_features, in_features).to(torch.bfloat16), torch.randn(out_features).to(torch.bfloat16)
    m = kernels.Matrix(w, b)
    assert m.picks["prefill"] == "numba"
    x = torch.randn(37, in_features).to(torch.bfloat16).float().numpy()
    together = prompt_rows(x, m)
    want = F.linear(torch.from_numpy(x), w.float(), b.float()).numpy()
    assert together.shape == want.shape and np.abs(together - want).max() <= 0.01 * np.abs(want).max()
    assert np.array_equal(together, torch.from_numpy(together).to(torch.bfloat16).float().numpy())  # bf16 values
    for i in range(len(x)):
        for place in range(4):
            rows = np.zeros((place + 1, in_features), np.float32)
            rows[place] = x[i]
            assert np.array_equal(prompt_rows(rows, m)[place], together[i]), (i, place)
    for count in (2, 7, 17):
        assert np.array_equal(prompt_rows(x[:count], m), together[:count])
    assert np.array_equal(prompt_rows(x[::-1].copy(), m), together[::-1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert np.array_equal(prompt_rows(x, m), together)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", ["numba", "numba-gemv", "torch-tile", "torch"])
def test_every_kernel_computes_the_projection(name, dtype):
    torch.manual_seed(2)
    w, b = torch.randn(70, 96).to(dtype), torch.randn(70).to(dtype)
    m = kernels.Matrix(w, b)
    x = torch.randn(20, 96).to(dtype).float().numpy()
    got = m.run(name, x)
    want = F.linear(torch.from_numpy(x).double(), w.double(), b.double()).numpy()
    assert got.dtype == np.float32 and got.shape == (20, 70)
    rounding = 2**-8 if name == "torch" and dtype != torch.float32 else 1e-5  # torch's F.linear rounds to dtype
    assert np.abs(got - want).max() <= rounding * 4 * np.abs(want).max()


@pytest.mark.parametrize("name", ["numba", "numba-gemv"])
def test_numba_decode_rows_do_not_depend_on_the_batch(name):
    torch.manual_seed(4)
    for dtype in (torch.bfloat16, torch.float16):
        m = kernels.Matrix(torch.randn(45, 200).to(dtype), None)
        x = torch.randn(kernels.MAX_ROWS, 200).to(torch.bfloat16).float().numpy()
        together = m.run(name, x)
        alone = np.concatenate([m.run(name, x[i : i + 1]) for i in range(len(x))])
        assert np.array_equal(together, alone)
        assert np.array_equal(m.run(name, x[3:9]), together[3:9])


def test_torchs_bf16_kernel_gives_one_row_the_bits_it_gets_beside_others():
    """torch's one-row bf16 F.linear (a GEMV) rounds ~1 output in 6000 the other way from its GEMM over two
    or more rows (torch 2.13, AVX-512-BF16): the ``torch`` kernel runs one row as two."""
    g = torch.Generator().manual_seed(6)
    m = kernels.Matrix((torch.randn(576, 1536, generator=g) * 0.05).to(torch.bfloat16), None)
    x = torch.randn(200, 1536, generator=g).to(torch.bfloat16).float().numpy()
    if not all(np.array_equal(m.run("torch", x[i : i + 2])[:1], m.run("torch", x[i : i + 5])[:1]) for i in range(len(x))):
        pytest.skip("torch's bf16 GEMM here gives a row other bits beside one row than beside four (no AVX-512 BF16?): "
                    "not batch-invariant at all, so the tuning never picks it on this CPU")
    alone = np.concatenate([m.run("torch", x[i : i + 1]) for i in range(len(x))])
    beside = np.concatenate([m.run("torch", x[i : i + 5])[:1] for i in range(len(x))])
    assert np.array_equal(alone, beside)
    assert np.array_equal(alone, m.run("torch", x))


def test_torch_runs_bf16_weights_only_on_a_cpu_with_a_bf16_dot_product():
    """Without one torch's bf16 GEMM is not batch-invariant (see ``Matrix.candidates``); float32 and fp16 keep it."""
    bf16 = kernels.Matrix(torch.randn(8, 64).to(torch.bfloat16), None)
    for kind in ("decode", "prefill"):
        assert ("torch" in bf16.candidates(kind, torch.bfloat16)) == bf16dot.SUPPORTED
        assert "torch" not in bf16.candidates(kind, torch.float32)  # not the weight's dtype
        assert "torch" in kernels.Matrix(torch.randn(8, 64), None).candidates(kind, torch.float32)
        assert "torch" in kernels.Matrix(torch.randn(8, 64).half(), None).candidates(kind, torch.float16)


def test_a_matrix_keeps_no_copy_of_its_weight():
    """The weight is held once, as stored: no transposed, float32 or other copy, before or after use."""
    w = torch.randn(64, 96).to(torch.bfloat16)
    m = kernels.Matrix(w, torch.randn(64).to(torch.bfloat16))
    for rows in (1, kernels.MAX_ROWS + 1):
        for name in {*m.candidates("decode", torch.bfloat16), *m.candidates("prefill", torch.bfloat16)}:
            m.run(name, torch.randn(rows, 96).float().numpy())
        m.matmul(torch.randn(rows, 96).to(torch.bfloat16))
    assert m.weight.data_ptr() == w.data_ptr() and np.shares_memory(m._kernel_blocks, w.view(torch.int16).numpy())
    big = [k for k, v in vars(m).items() if getattr(v, "nbytes", 0) >= w.nbytes and k not in ("weight", "_kernel_blocks")]
    assert big == []
    assert m.nbytes == 64 * 96 * 2 + 64 * 2 and m.shape == (64, 96)


def test_matmul_routes_rows_by_the_picks():
    """The torch path: up to MAX_ROWS rows by the decode pick, more by the prefill pick; a pick that cannot
    take x's dtype (torch's bf16 F.linear for float32 activations) falls back to numba."""
    torch.manual_seed(1)
    w = torch.randn(16, 32).to(torch.bfloat16)
    m = kernels.Matrix(w, None)
    small, large = torch.randn(2, 32).to(torch.bfloat16), torch.randn(kernels.MAX_ROWS + 1, 32).to(torch.bfloat16)
    m.picks.update(decode="numba-gemv", prefill="torch")
    assert torch.equal(m.matmul(small), torch.from_numpy(m.run("numba-gemv", small.float().numpy())).to(torch.bfloat16))
    assert torch.equal(m.matmul(large), F.linear(large, w))
    x32 = large.float()
    assert torch.equal(m.matmul(x32), torch.from_numpy(m.run("numba", x32.numpy())))
    assert kernels.linear_bf16(small, m).dtype == torch.bfloat16


def test_stack_joins_projections_into_one():
    torch.manual_seed(5)
    q8, q4 = quant.Q.Q8_0, quant.Q.Q4_0
    dense = [kernels.Matrix(torch.randn(o, 64).to(torch.bfloat16), torch.randn(o).to(torch.bfloat16) if o == 8 else None)
             for o in (8, 12)]
    quants = [quant.QuantMatrix.quantize(torch.randn(o, 64), q8, np.ones(o, np.float32) if o == 4 else None) for o in (4, 6)]
    mixed = [quant.QuantMatrix.quantize(torch.randn(4, 64), q4), quants[1], dense[0]]
    x = torch.randn(3, 64).to(torch.bfloat16).float().numpy()
    for parts, kind in ((dense, kernels.Matrix), (quants, quant.QuantMatrix), (mixed, kernels.Stacked)):
        s = kernels.stack(parts)
        assert isinstance(s, kind) and s.shape == (sum(p.shape[0] for p in parts), 64)
        zero_bias = {kernels.Matrix: 2 * 12, quant.QuantMatrix: 4 * 6, kernels.Stacked: 0}[kind]  # parts without one
        assert s.nbytes == sum(p.nbytes for p in parts) + zero_bias
        for method in ("decode", "prefill"):
            assert np.array_equal(getattr(s, method)(x), np.concatenate([getattr(p, method)(x) for p in parts], 1))
        assert torch.equal(s.matmul(torch.from_numpy(x)), torch.cat([p.matmul(torch.from_numpy(x)) for p in parts], 1))
    assert kernels.stack(dense[:1]) is dense[0]
    with pytest.raises(ValueError, match="share in_features"):
        kernels.stack([dense[0], kernels.Matrix(torch.zeros(2, 32, dtype=torch.bfloat16), None)])
    with pytest.raises(ValueError, match="at least one"):
        kernels.stack([])


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


def _reference_layer(h, ln1, qkv, o, ln2, gu, down, positions, inv_freq, heads, kv_heads, hd, eps, bf=torch.bfloat16):
    """The torch path of a Llama layer in dtype ``bf`` for one request's rows at ``positions`` (its keys are all
    in ``h``'s rows: a prompt): weights as float32 [O, I] (dequantized), every op rounded to ``bf``."""
    h = h.to(bf)

    def norm(x, w):
        return torch.from_numpy(w).to(bf) * F.rms_norm(x.float(), (x.shape[1],), eps=eps).to(bf)

    def proj(x, w):
        return (x.float() @ w.T).to(bf)

    T = h.shape[0]
    freqs = positions[:, None].float() * torch.from_numpy(inv_freq)[None, :]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(bf)[:, None], emb.sin()
    sin[:, : hd // 2].neg_()
    sin = sin.to(bf)[:, None]
    x = proj(norm(h, ln1), qkv).view(T, heads + 2 * kv_heads, hd)
    qk = x[:, : heads + kv_heads]
    qk = qk * cos + qk.roll(hd // 2, -1) * sin
    q, k, v = qk[:, :heads], qk[:, heads:], x[:, heads + kv_heads:]
    attn = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                          enable_gqa=True).transpose(0, 1).reshape(T, heads * hd)
    h = h + proj(attn, o)
    g, u = proj(norm(h, ln2), gu).chunk(2, -1)
    return h + proj(F.silu(g) * u, down)


@pytest.mark.parametrize("mode", [kernels.BF16, kernels.F32], ids=["bf16", "float32"])
@pytest.mark.parametrize("qtype", [quant.Q.Q8_0, quant.Q.Q4_1, quant.Q.Q6_K, "mixed"], ids=str)
def test_a_fused_layer_of_quantized_projections_computes_the_torch_layer(qtype, mode):
    """fused_layer with QuantMatrix projections (weights as GGUF blocks) equals the torch path on the
    dequantized weights, for a prompt and for the decode row after it: in bf16 (rounding after every op, a
    bf16 KV cache) to a few bf16 ulps, in float32 (no rounding, a float32 KV cache) to float32 rounding;
    decode rows of several requests are each their row alone, bit for bit."""
    from bench.quant_kernels import F16_OFFSETS, random_blocks

    rng = np.random.default_rng(0)
    D, heads, kv_heads, hd, inter, eps = 256, 4, 2, 64, 512, 1e-5
    block = 4

    def q(o, i, t=quant.Q.Q6_K if qtype == "mixed" else qtype):
        if t in quant.QUANTIZABLE:
            return quant.QuantMatrix.quantize(rng.standard_normal((o, i)).astype(np.float32) * 0.1, t)
        blocks = random_blocks(t, o, i, rng)  # random quants and sub-block scales; f16 scales made small
        size, n = blocks.shape[1] // (i // 256), i // 256
        view = blocks.reshape(o, n, size)
        for off in F16_OFFSETS[t]:
            view[:, :, off:off + 2] = rng.uniform(1e-5, 1e-4, (o, n)).astype(np.float16).view(np.uint8).reshape(o, n, 2)
        return quant.QuantMatrix(t, (o, i), blocks)

    if qtype == "mixed":  # q/k Q4_K and v Q8_0 stacked (as some GGUFs store them), the rest Q6_K and bf16
        qkv = kernels.stack([q((heads + kv_heads) * hd, D, quant.Q.Q4_K), q(kv_heads * hd, D, quant.Q.Q8_0)])
        assert isinstance(qkv, kernels.Stacked)
        dense = kernels.Matrix(torch.randn(D, heads * hd).mul(0.05).to(torch.bfloat16), None)
        projs = [qkv, dense, q(2 * inter, D), q(D, inter)]
    else:
        projs = [q((heads + 2 * kv_heads) * hd, D), q(D, heads * hd), q(2 * inter, D), q(D, inter)]
    ln1, ln2 = (torch.rand(D).add(0.5).to(torch.bfloat16).float().numpy() for _ in range(2))
    w = kernels.LayerWeights(ln1, projs[0], projs[1], ln2, projs[2], projs[3], eps)
    dense = [torch.cat([part.dequantize_rows(0, part.shape[0]) for part in kernels.tiled([p])]) for p in projs]
    inv_freq = (1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)).numpy()
    T = 9
    h = torch.randn(T + 1, D).to(torch.bfloat16)
    dtype = torch.bfloat16 if mode is kernels.BF16 else torch.float32
    want = _reference_layer(h, ln1, dense[0], dense[1], ln2, dense[2], dense[3], torch.arange(T + 1), inv_freq,
                            heads, kv_heads, hd, eps, dtype).float().numpy()

    def run(rows, prompt, k, v, table=(0, 1, 2)):
        x = h[rows].float().numpy().copy()
        pos = np.array(rows, np.int64)
        slots = np.array([table[p // block] * block + p % block for p in rows], np.int64)
        batch = kernels.RowBatch.build(pos, inv_freq, 1.0, slots, np.array([table] * len(rows), np.int64), block, prompt,
                                       mode)
        kernels.fused_layer(x, w, batch, heads, kv_heads, hd, k, v)
        return x

    k, v = np.zeros((12, kv_heads, hd), mode.dtype), np.zeros((12, kv_heads, hd), mode.dtype)
    got = np.concatenate([run(list(range(T)), True, k, v), run([T], False, k, v)])
    scale = np.abs(want).max()
    tolerance = 0.02 if mode is kernels.BF16 else 1e-5  # a few bf16 ulps; float32 sums in another order
    assert np.abs(got - want).max() <= tolerance * scale, np.abs(got - want).max() / scale
    # three requests decoding together (their caches copies of this one's): each row is the row alone, bit for bit
    alone = run([T], False, k.copy(), v.copy())
    kk, vv = np.concatenate([k, k, k]), np.concatenate([v, v, v])
    x = h[[T, T, T]].float().numpy().copy()
    tables = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]], np.int64)
    slots = tables[:, T // block] * block + T % block
    batch = kernels.RowBatch.build(np.full(3, T, np.int64), inv_freq, 1.0, slots, tables, block, False, mode)
    kernels.fused_layer(x, w, batch, heads, kv_heads, hd, kk, vv)
    assert all(np.array_equal(x[i], alone[0]) for i in range(3))
    with pytest.raises(ValueError, match="KV cache"):
        kernels.fused_layer(x, w, batch, heads, kv_heads, hd, kk.view(np.uint8), vv.view(np.uint8))


def test_every_cached_numba_function_says_its_own_fastmath():
    """numba compiles a callee with its caller's fastmath unless the callee says, and caches that code under the
    same key: a process whose fastmath layer compiled ``int8dot._matmul`` first changed its bits in every later
    process (seen: ``test_every_instruction_set_gives_the_same_bits`` failed after a stage process ran)."""
    from numba.core.registry import CPUDispatcher

    from parallax.stages import bf16dot, int8dot
    cached = [(m.__name__, name, f) for m in (kernels, quant, int8dot, bf16dot) for name, f in vars(m).items()
              if isinstance(f, CPUDispatcher) and f._cache.__class__.__name__ != "NullCache"]
    assert len(cached) > 20
    assert [(m, name) for m, name, f in cached if "fastmath" not in f.targetoptions] == []
