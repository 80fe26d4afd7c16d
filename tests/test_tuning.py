"""Kernel choice by measurement (stages/tuning.py): picks, batch invariance of what is picked, the cache."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from parallax.stages import kernels, tuning
from parallax.stages.quant import Q, QuantMatrix


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PARALLAX_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "BUDGET_S", 0.002)  # short measurements: the picks are not asserted on
    return tmp_path


def stage_projections() -> list[kernels.Projection]:
    """Two layers of two shapes (bf16), a quantized one and a mixed stack: three distinct (shape, format)."""
    torch.manual_seed(0)
    dense = [kernels.Matrix(torch.randn(o, 64).to(torch.bfloat16), None) for o in (96, 32, 96, 32)]
    q = QuantMatrix.quantize(torch.randn(40, 64), Q.Q8_0)
    return dense + [q, kernels.stack([QuantMatrix.quantize(torch.randn(8, 64), Q.Q4_0), dense[1]])]


def test_picks_are_measured_set_cached_and_reused(cache_dir):
    projections = stage_projections()
    before = tuning.measurements
    summary = tuning_summary = kernels.tune(projections, torch.bfloat16)
    assert tuning.measurements > before  # timed
    assert set(summary) == {f"{s} {kind}" for s in ("96x64 bf16", "32x64 bf16", "40x64 Q8_0", "8x64 Q4_0")
                            for kind in ("decode", "prefill")}
    for p in kernels.tiled(projections):
        O, I = p.shape
        assert p.picks == {kind: summary[f"{O}x{I} {p.fmt} {kind}"] for kind in ("decode", "prefill")}
        for kind in ("decode", "prefill"):
            assert p.picks[kind] in p.candidates(kind, torch.bfloat16)
    files = list((cache_dir / "kernels").glob("*.json"))
    assert files == [tuning.cache_file()]
    stored = json.loads(files[0].read_text())
    assert stored["machine"] == tuning.machine_key() and len(stored["picks"]) == 4

    fresh = stage_projections()
    before, mtime = tuning.measurements, files[0].stat().st_mtime_ns
    assert kernels.tune(fresh, torch.bfloat16) == tuning_summary
    assert tuning.measurements == before and files[0].stat().st_mtime_ns == mtime  # read, not measured
    assert [p.picks for p in kernels.tiled(fresh)] == [p.picks for p in kernels.tiled(projections)]
    kernels.tune(stage_projections(), torch.float32)  # another activation dtype: measured (and added)
    assert tuning.measurements > before and len(json.loads(files[0].read_text())["picks"]) == 8


def test_the_cache_key_changes_with_the_thread_count():
    threads = torch.get_num_threads()
    key = tuning.machine_key()
    assert key["threads"] == threads and key["torch"] == torch.__version__ and key["cpu"]
    try:
        torch.set_num_threads(threads + 1)
        other = tuning.machine_key()
    finally:
        torch.set_num_threads(threads)
    assert other["threads"] == threads + 1 and tuning.cache_file(other) != tuning.cache_file(key)


def test_the_cache_key_changes_with_the_kernels_code(monkeypatch):
    key = tuning.machine_key()
    monkeypatch.setattr(tuning, "_KERNEL_SOURCES", tuning._KERNEL_SOURCES[1:])  # other code: other bytes
    assert tuning.machine_key()["kernels"] != key["kernels"] and tuning.cache_file() != tuning.cache_file(key)


def test_a_corrupt_cache_is_ignored_with_a_warning(caplog):
    path = tuning.cache_file()
    path.parent.mkdir(parents=True)
    for garbage in ("{not json", '{"picks": [1, 2]}', '{"picks": {"96x64 bf16 bfloat16": {"decode": "no-such-kernel"}}}'):
        path.write_text(garbage)
        before = tuning.measurements
        with caplog.at_level(logging.WARNING, logger=tuning.__name__):
            caplog.clear()
            summary = kernels.tune(stage_projections()[:1], torch.bfloat16)
        assert tuning.measurements > before and set(summary) == {"96x64 bf16 decode", "96x64 bf16 prefill"}
        picked = json.loads(path.read_text())["picks"]["96x64 bf16 bfloat16"]["picks"]["decode"]
        assert picked in stage_projections()[0].candidates("decode", torch.bfloat16)  # whichever measured fastest
        if garbage.startswith("{not") or "[1, 2]" in garbage:
            assert any("ignoring the kernel choice cache" in r.message for r in caplog.records)


class Flaky(kernels.Matrix):
    """A Matrix whose torch kernel gives a row other bits at some row counts (as BLAS may)."""

    def _torch_numpy(self, x: np.ndarray) -> np.ndarray:
        out = super()._torch_numpy(x)
        if len(x) in (tuning.MAX_ROWS, tuning.PREFILL_ROWS[-1]):
            out[0] = np.nextafter(out[0], np.inf)
        return out


class Placed(kernels.Matrix):
    """A Matrix whose torch kernel gives a row other bits at odd places in the batch, whatever the row count (torch's
    bf16 GEMM did so on a CPU without AVX-512 BF16: 576x576, rows 3 on)."""

    def _torch_numpy(self, x: np.ndarray) -> np.ndarray:
        out = super()._torch_numpy(x)
        out[1::2] = np.nextafter(out[1::2], np.inf)
        return out


def test_a_candidate_whose_rows_depend_on_their_place_is_not_invariant():
    m = Placed(torch.randn(48, 64).to(torch.bfloat16), None)
    x = np.random.default_rng(0).standard_normal((16, 64), np.float32)
    assert tuning._score(m, "torch", x, (1, 4, 16), check=(3, 7)) is None
    assert tuning._score(m, "numba", x, (1, 4, 16), check=(3, 7)) is not None


def test_a_candidate_that_is_not_batch_invariant_is_never_picked(monkeypatch):
    """Flaky's torch kernel is also made the fastest: it is still not picked, for either row kind. float32: torch is
    a candidate for it on every CPU (for bf16 only on CPUs with AVX-512 BF16)."""
    m = Flaky(torch.randn(48, 64), None)
    real, favoured = tuning._score, ["torch"]

    def favour(p, name, x, rows, bound, check):
        score = real(p, name, x, rows, check=check)
        return None if score is None else (0.0 if name == favoured[0] else score)

    monkeypatch.setattr(tuning, "_score", favour)
    assert "torch" in m.candidates("decode", torch.float32)
    summary = kernels.tune([m], torch.float32)
    assert summary["48x64 f32 decode"] != "torch" and summary["48x64 f32 prefill"] != "torch"
    assert real(m, "torch", np.ones((16, 64), np.float32), (1, 16)) is None
    assert real(m, "numba", np.ones((16, 64), np.float32), (1, 16)) is not None
    assert real(m, "numba", np.ones((16, 64), np.float32), (1, 16), bound=0.0) == float("inf")  # lost: not finished
    favoured[0] = "numba"  # invariant on every CPU (torch's bf16 GEMM is not on some)
    ok = kernels.Matrix(torch.randn(50, 64).to(torch.bfloat16), None)
    assert kernels.tune([ok], torch.bfloat16)["50x64 bf16 prefill"] == "numba"  # fastest and invariant: picked


def test_picked_kernels_keep_rows_batch_invariant():
    """Whatever is picked on this machine: decode rows at 1 and 16 rows, prompt rows at 64 and 256, same bits."""
    projections = stage_projections()
    kernels.tune(projections, torch.bfloat16)
    x = torch.randn(256, 64).to(torch.bfloat16).float().numpy()
    for p in projections:
        assert np.array_equal(p.decode(x[:1]), p.decode(x[:16])[:1])
        assert np.array_equal(p.prefill(x[:64]), p.prefill(x)[:64])


def test_projections_finds_what_a_model_holds():
    projections = stage_projections()
    model = torch.nn.Module()
    model.inner = torch.nn.Module()
    model.inner.__dict__["qkv"] = projections[0]
    hidden = torch.nn.Module()
    hidden.__dict__["down"] = projections[5]
    model.__dict__["plain"] = hidden  # a module kept as a plain attribute
    model.__dict__["_arrays"] = kernels.LayerWeights(np.ones(64, np.float32), projections[1], projections[2],
                                                     np.ones(64, np.float32), projections[3], projections[4], 1e-6)
    found = kernels.projections(model)
    assert sorted(map(id, found)) == sorted(map(id, projections))
    assert kernels.tune([], torch.bfloat16) == {}
