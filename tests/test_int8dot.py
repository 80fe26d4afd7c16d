"""GGUF blocks times int8-quantized activations (``stages.int8dot``): the tiles are the blocks' bytes moved, the
kernel computes exactly the product of the two dequantized operands, a row's bits do not depend on the other
rows or on the instruction set, a fused layer in one call is the per-op path bit for bit, and so is a stage's
every layer run from arguments looked up once."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch

from parallax.stages import int8dot, kernels, tuning
from parallax.stages.quant import INT8, QuantMatrix

Q = gguf.GGMLQuantizationType
FORMATS = list(int8dot.FORMATS)
pytestmark = pytest.mark.skipif(int8dot.SIMD is None, reason="no AVX2 on this CPU: no int8 kernel")


def quantized(qtype: Q, O: int, I: int, seed: int = 0, bias: bool = True) -> QuantMatrix:
    rng = np.random.default_rng(seed)
    b = rng.standard_normal(O).astype(np.float32) if bias else None
    return QuantMatrix.quantize(rng.standard_normal((O, I), dtype=np.float32) * 0.1, qtype, bias=b)


def exact(m: QuantMatrix, x: np.ndarray) -> np.ndarray:
    """float64 product of gguf's dequantization of the weight and of the int8 activation blocks (+ bias)."""
    O, I = m.shape
    qx, dx, _ = int8dot.quantize_rows(x)
    xq = (qx.reshape(len(x), -1, 32).astype(np.float64) * dx[..., None]).reshape(len(x), I)
    return xq @ gguf.quants.dequantize(m.blocks, m.qtype).reshape(O, I).T.astype(np.float64) + m.bias


@pytest.mark.parametrize("qtype", FORMATS, ids=str)
def test_the_tiles_are_the_blocks_bytes_moved(qtype):
    blocks = quantized(qtype, 48, 96).blocks
    tiles = int8dot.repack(qtype, blocks)
    assert tiles.shape == (6, blocks.shape[1] * 8) and sorted(tiles.ravel()) == sorted(blocks.ravel())
    assert np.array_equal(int8dot.repack(qtype, blocks, rows_per_chunk=16), tiles)  # chunked: the same
    ids = np.array([0, 47, 9, 9, 31])
    assert np.array_equal(int8dot.unpack_rows(qtype, tiles, ids), blocks[ids])


def test_activations_quantize_to_int8_blocks():
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    x[2, 32:] = 0  # an all-zero block: scale 0, quants 0
    qx, dx, sx = int8dot.quantize_rows(x)
    back = qx.reshape(3, 2, 32) * dx[..., None]
    assert np.abs(back - x.reshape(3, 2, 32)).max() <= 0.5 * dx.max() * 1.0001  # half a step
    assert np.abs(qx).max() == 127 and dx[2, 1] == 0 and not qx[2, 32:].any()
    assert np.allclose(sx, dx * qx.reshape(3, 2, 32).sum(-1), rtol=1e-6)


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("qtype", FORMATS, ids=str)
def test_the_kernel_is_the_exact_product_of_the_dequantized_operands(qtype, rows):
    m = quantized(qtype, 72, 320)
    x = np.random.default_rng(2).standard_normal((rows, 320)).astype(np.float32)
    want = exact(m, x)
    got = m.run(INT8, x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(got - x @ m.dequantize_rows(0, 72).numpy().T - m.bias).max() <= 0.03 * np.abs(want).max()  # int8 x


@pytest.mark.parametrize("qtype", FORMATS, ids=str)
def test_a_rows_bits_do_not_depend_on_the_other_rows(qtype):
    m = quantized(qtype, 64, 128)
    x = np.random.default_rng(3).standard_normal((16, 128)).astype(np.float32)
    full = m.run(INT8, x)
    assert all(np.array_equal(m.run(INT8, x[i:i + 1])[0], full[i]) for i in (0, 7, 15))
    assert np.array_equal(m.run(INT8, x[::-1])[::-1], full)


LEVELS = ("avx2", "vnni", "vnni512")


@pytest.mark.parametrize("level", [lv for lv in LEVELS if int8dot.SIMD in LEVELS and LEVELS.index(lv) < LEVELS.index(int8dot.SIMD)])
def test_every_instruction_set_gives_the_same_bits(tmp_path, level):
    """The same integer sums by vpmaddubsw + vpmaddwd (AVX2), 32-byte vpdpbusd (VNNI) and 64-byte vpdpbusd
    (AVX-512, two rows an instruction), the float math in the same order: the bits this CPU's kernel gives
    (the other code compiled in a fresh numba cache, so this CPU's is not read back)."""
    code = (f"import sys, numpy as np; from parallax.stages import int8dot; int8dot.SIMD = {level!r}\n"
            "from tests.test_int8dot import quantized, FORMATS\n"
            "x = np.random.default_rng(4).standard_normal((3, 256)).astype(np.float32)\n"
            "np.save(sys.argv[1], np.stack([quantized(q, 64, 256).run('int8', x) for q in FORMATS]))\n")
    env = {**__import__("os").environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "other.npy")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    x = np.random.default_rng(4).standard_normal((3, 256)).astype(np.float32)
    assert np.array_equal(np.load(tmp_path / "other.npy"), np.stack([quantized(q, 64, 256).run(INT8, x) for q in FORMATS]))


def test_offered_for_bf16_activations_and_whole_tiles_only():
    assert INT8 in quantized(Q.Q4_1, 64, 32).candidates("decode", torch.bfloat16)
    assert INT8 not in quantized(Q.Q4_1, 64, 32).candidates("decode", torch.float32)  # float32 stays exact
    assert INT8 not in quantized(Q.Q8_0, 60, 32).candidates("decode", torch.bfloat16)  # 60 rows: not tiles of 8
    assert INT8 not in quantized(Q.Q5_0, 64, 32).candidates("decode", torch.bfloat16)
    assert INT8 in tuning.OWN_LAYOUT


def test_settling_on_it_holds_the_tiles_instead_of_the_blocks():
    m = quantized(Q.Q8_0, 64, 64)  # a tied Q8_0 embedding/lm_head: rows still read for token ids
    ids = torch.tensor([5, 63, 0, 5])
    before, stored = m.take_rows(ids), m.nbytes
    m.picks.update(decode=INT8, prefill=INT8)
    m.settle()
    assert m.repacked and m.blocks.size == 0 and m.nbytes == stored  # the same bytes, held once
    assert torch.equal(m.take_rows(ids), before) and m.candidates("prefill", torch.bfloat16) == (INT8,)
    with pytest.raises(ValueError, match="held in the int8 layout"):
        m.run("int4pack", np.zeros((1, 64), np.float32))
    mixed = quantized(Q.Q4_0, 64, 64)
    mixed.picks.update(decode=INT8, prefill="numba")
    with pytest.raises(ValueError, match="every row kind must use it"):
        mixed.settle()


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=str)
def test_a_fused_int8_layer_is_the_per_op_path_bit_for_bit(qtype, monkeypatch):
    """fused_layer runs a layer whose projections all picked int8 in one numba call: the same hidden states and
    KV cache bits as the per-op path (attention_rows + mlp_rows, each projection by the int8 kernel), for a
    prompt and for a decode row; and decode rows of three requests are each the row alone."""
    rng = np.random.default_rng(5)
    D, heads, kv_heads, hd, inter, block = 128, 4, 2, 32, 256, 4
    projs = [quantized(qtype, o, i, seed, bias=seed == 0)
             for seed, (o, i) in enumerate([((heads + 2 * kv_heads) * hd, D), (D, heads * hd), (2 * inter, D), (D, inter)])]
    for p in projs:
        p.picks.update(decode=INT8, prefill=INT8)
        p.settle()
    ln1, ln2 = (rng.uniform(0.5, 1.5, D).astype(np.float32) for _ in range(2))
    inv_freq = (1.0 / 10000 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    h = torch.randn(8, D).to(torch.bfloat16).float().numpy()

    def run(fused, rows, prompt, k, v, tables=((0, 1),)):
        monkeypatch.setattr(kernels, "_int8_weights", real if fused else lambda w, b: None)
        w = kernels.LayerWeights(ln1, projs[0], projs[1], ln2, projs[2], projs[3], 1e-5)
        x = h[rows].copy()
        tab = np.array([tables[i % len(tables)] for i in range(len(rows))], np.int64)
        slots = np.array([tab[i, p // block] * block + p % block for i, p in enumerate(rows)], np.int64)
        batch = kernels.RowBatch.build(np.array(rows, np.int64), inv_freq, 1.0, slots, tab, block, prompt)
        kernels.fused_layer(x, w, batch, heads, kv_heads, hd, k, v)
        return x

    real = kernels._int8_weights
    caches = {f: (np.zeros((24, kv_heads, hd), np.uint16), np.zeros((24, kv_heads, hd), np.uint16)) for f in (0, 1)}
    for rows, prompt in ((list(range(7)), True), ([7], False)):
        got, want = (run(f, rows, prompt, *caches[f]) for f in (True, False))
        assert np.array_equal(got, want) and np.abs(got).max() > 0
    assert all(np.array_equal(a, b) for a, b in zip(caches[True], caches[False]))
    alone = run(True, [7], False, caches[True][0].copy(), caches[True][1].copy())
    k, v = (np.concatenate([c[:8]] * 3) for c in caches[True])  # three requests with the same 8 keys
    three = run(True, [7, 7, 7], False, k, v, tables=((0, 1), (2, 3), (4, 5)))
    assert all(np.array_equal(row, alone[0]) for row in three)
    with pytest.raises(ValueError, match="KV cache"):
        run(True, [7], False, k.view(np.uint8), v.view(np.uint8))


def test_a_stage_run_at_once_is_its_layers_one_by_one_bit_for_bit():
    """fused_stage runs every layer of a stage (here three, one of them sliding, two formats) from arguments looked
    up once: the same hidden states and KV cache bits as fused_layer layer by layer, for prompt rows and for a
    decode row. A stage with a layer that did not pick int8 for a row kind is not offered it for that kind."""
    rng = np.random.default_rng(6)
    D, heads, kv_heads, hd, inter, block, n = 128, 4, 2, 32, 256, 4, 3
    shapes = [((heads + 2 * kv_heads) * hd, D), (D, heads * hd), (2 * inter, D), (D, inter)]
    layers = []
    for layer, qtype in enumerate((Q.Q4_0, Q.Q4_1, Q.Q4_0)):
        projs = [quantized(qtype, o, i, 10 * layer + k, bias=False) for k, (o, i) in enumerate(shapes)]
        for p in projs:
            p.picks.update(decode=INT8, prefill=INT8)
            p.settle()
        ln1, ln2 = (rng.uniform(0.5, 1.5, D).astype(np.float32) for _ in range(2))
        layers.append((kernels.LayerWeights(ln1, *projs[:2], ln2, *projs[2:], 1e-5), 5 if layer == 1 else 0))
    inv_freq = (1.0 / 10000 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    h = torch.randn(8, D).to(torch.bfloat16).float().numpy()
    caches = {f: (np.zeros((n, 24, kv_heads, hd), np.uint16), np.zeros((n, 24, kv_heads, hd), np.uint16)) for f in (0, 1)}
    for rows, prompt in ((list(range(7)), True), ([7], False)):
        table = np.array([[0, 1]] * len(rows), np.int64)
        slots = np.array([table[0, p // block] * block + p % block for p in rows], np.int64)
        batch = kernels.RowBatch.build(np.array(rows, np.int64), inv_freq, 1.0, slots, table, block, prompt)
        stage = kernels.int8_stage(layers, prompt)
        assert stage is not None
        got, want = h[rows].copy(), h[rows].copy()
        kernels.fused_stage(got, stage, batch, heads, kv_heads, hd, *caches[True])
        for i, (w, window) in enumerate(layers):
            kernels.fused_layer(want, w, batch, heads, kv_heads, hd, caches[False][0][i], caches[False][1][i], window)
        assert np.array_equal(got, want) and np.abs(got).max() > 0 and not np.array_equal(got, h[rows])
    assert all(np.array_equal(a, b) for a, b in zip(caches[True], caches[False]))
    slow = quantized(Q.Q4_0, D, inter, 99, bias=False)
    slow.picks.update(decode=INT8, prefill="numba")
    other = [layers[0], (replace(layers[1][0], down=slow, int8={}), 0)]
    assert kernels.int8_stage(other, prompt=True) is None and kernels.int8_stage(other, prompt=False) is not None
