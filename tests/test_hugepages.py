"""Repacked weights are held on memory advised to use 2 MiB pages (stages/hugepages.py)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from parallax.stages import hugepages, int8dot
from parallax.stages.quant import INT8, QuantMatrix

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds ``address``."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def test_weights_are_separate_aligned_and_sized():
    a = hugepages.empty((3, 100), np.float32)
    b = hugepages.empty((7,), np.uint8)
    big = hugepages.empty((hugepages.CHUNK,), np.uint8)  # its own mapping
    assert a.shape == (3, 100) and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % hugepages.ALIGN == 0 and b.ctypes.data % hugepages.ALIGN == 0
    assert big.ctypes.data % hugepages.HUGE == 0 and big.size == hugepages.CHUNK
    a[:] = 1.0
    b[:] = 7
    big[:] = 3
    assert float(a.sum()) == 300.0 and int(b.sum()) == 49 and not np.shares_memory(a, b)


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_the_memory_may_use_huge_pages():
    w = hugepages.empty((4 << 20,), np.uint8)
    w[:] = 1
    assert mapping_of(w.ctypes.data).get("THPeligible") == "1"


def test_a_settled_int8_weight_lives_there_and_keeps_its_bytes():
    rng = np.random.default_rng(0)
    q = gguf.GGMLQuantizationType.Q4_1
    blocks = gguf.quants.quantize(rng.standard_normal((16, 64), dtype=np.float32), q).reshape(16, -1)
    m = QuantMatrix(q, (16, 64), blocks)
    x = rng.standard_normal((2, 64), dtype=np.float32)
    before = m.run(INT8, x)
    m.picks.update(decode=INT8, prefill=INT8)
    m.settle()
    _, tiles, _ = m.int8_operands()
    assert np.array_equal(int8dot.unpack_rows(q, tiles, np.arange(16)), blocks)
    assert np.array_equal(m.run(INT8, x), before)
    if THP.exists() and "[never]" not in THP.read_text():
        assert mapping_of(tiles.ctypes.data).get("THPeligible") == "1"
