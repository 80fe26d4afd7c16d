"""Weights on 2 MiB pages: the repacked weights a stage holds come from chunks of anonymous memory that Linux is
asked to back with transparent huge pages (``madvise(MADV_HUGEPAGE)``; the usual setting,
``/sys/kernel/mm/transparent_hugepage/enabled`` = ``madvise``, gives none without it).

A decode step streams every weight once, mostly from DRAM when the weights do not stay in the cache (the other
stage on the machine reads its own in between). On 4 KiB pages that walk misses the TLB every 4 KiB and the
hardware prefetcher stops at every page's end. 15 layers of SmolLM2 Q4_1 (32 MiB of int8-kernel tiles, one row,
2 threads, AMD EPYC Zen 4 avx512_vnni), the 105 matrix products of a step with the cache flushed in between:
1.8-2.3 ms on 4 KiB pages, 1.4-1.7 ms on 2 MiB pages; the whole step 3.4-4.1 -> 3.0-3.1 ms.

Weights are taken from a chunk of ``CHUNK`` bytes in turn (each at a 64-byte boundary); one as large as half a
chunk gets a mapping of its own. A chunk lives as long as any weight in it (numpy keeps the mapping as the
arrays' base), so a stage that drops its layers gives their memory back. Pages are only resident once written:
the unused end of the current chunk costs address space, not memory. Elsewhere (no ``MADV_HUGEPAGE``, not Linux)
the same memory on ordinary pages.
"""

from __future__ import annotations

import mmap
import threading

import numpy as np

CHUNK = 32 << 20  # bytes per shared chunk
HUGE = 2 << 20  # the huge page size the chunks are aligned to
ALIGN = 64  # each weight starts on a cache line
_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only


class _Chunks:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunk: np.ndarray | None = None
        self._used = 0

    def take(self, nbytes: int) -> np.ndarray:
        """uint8 [nbytes], uninitialized."""
        if nbytes >= CHUNK // 2:
            return _mapped(nbytes)
        with self._lock:
            if self._chunk is None or self._used + nbytes > self._chunk.size:
                self._chunk, self._used = _mapped(CHUNK), 0
            out = self._chunk[self._used : self._used + nbytes]
            self._used += -(-nbytes // ALIGN) * ALIGN
            return out


def _mapped(nbytes: int) -> np.ndarray:
    """uint8 [nbytes] at a huge page boundary of a fresh anonymous mapping advised to use huge pages."""
    size = -(-nbytes // HUGE) * HUGE
    m = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if _ADVICE is not None:
        m.madvise(_ADVICE)
    whole = np.frombuffer(m, np.uint8)
    skip = -whole.ctypes.data % HUGE
    return whole[skip : skip + nbytes]


_CHUNKS = _Chunks()


def held(a: np.ndarray) -> np.ndarray:
    """A C-order copy of ``a`` for the stage's lifetime. Only what is kept goes here: the memory of an array
    dropped from a chunk is not used again while the chunk lives."""
    out = empty(a.shape, a.dtype)
    out[...] = a
    return out


def empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialized C-order array for a weight held for the stage's lifetime (see the module's doc)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    return _CHUNKS.take(count * dtype.itemsize).view(dtype).reshape(shape)
