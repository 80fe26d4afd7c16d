"""TEMPORARY stand-ins for the parts of the kernels branch's Projection API (notes/ISSUE9.md) that
``stages.kernels`` / ``stages.quant`` on main do not have yet, so that this branch runs and tests on
its own. Everything here is inert once the kernels branch is merged (``MERGED``): the lead deletes
this file and its one import in ``llama.py`` then.

Stand-ins (used only while ``not MERGED``): ``kernels.Projection``, ``kernels.stack``,
``kernels.Matrix.{shape, nbytes, matmul, decode}``, and a bias on a ``QuantMatrix`` (``with_bias``).
They compute the same function as the documented API; the torch path of a bf16 ``Matrix`` above
``kernels.MAX_ROWS`` rows widens the weight for that call only (a transient, not a kept copy).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .. import kernels
from ..quant import QuantMatrix

MERGED = hasattr(kernels, "stack")


def with_bias(q: QuantMatrix, bias: torch.Tensor | None):
    """``q`` with a bias added after the product (documented: ``QuantMatrix(qtype, shape, blocks, bias=)``)."""
    if bias is None:
        return q
    if MERGED:
        return QuantMatrix(q.qtype, q.shape, q.blocks, bias=bias)
    return _Biased(q, bias.detach().float())  # float32, as the merged QuantMatrix holds it


class _Biased:
    def __init__(self, inner, bias: torch.Tensor):
        self.inner, self.bias, self.shape = inner, bias, inner.shape

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes + self.bias.nbytes

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [M, I] -> [M, O] in x.dtype
        return (self.inner.matmul(x.float()) + self.bias).to(x.dtype)


class _Concat:
    """Parts of different types side by side: each runs, outputs concatenated (as kernels.stack does)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.matmul(x) for p in self.parts], 1)


def _stack(parts: list):
    if all(isinstance(p, kernels.Matrix) for p in parts):
        biases = [p._bias for p in parts]
        bias = None if biases[0] is None else torch.cat(biases)
        return kernels.Matrix(torch.cat([p.weight for p in parts]), bias)
    kinds = {p.qtype for p in parts if isinstance(p, QuantMatrix)}
    if len(kinds) == 1 and all(isinstance(p, QuantMatrix) for p in parts):
        O = sum(p.shape[0] for p in parts)
        return QuantMatrix(parts[0].qtype, (O, parts[0].shape[1]), np.concatenate([p.blocks for p in parts]))
    if all(isinstance(p, _Biased) for p in parts):
        return _Biased(_stack([p.inner for p in parts]), torch.cat([p.bias for p in parts]))
    return _Concat(parts)


def _matrix_matmul(self, x: torch.Tensor) -> torch.Tensor:  # [M, I] -> [M, O] in x.dtype
    if x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16 and x.shape[0] <= kernels.MAX_ROWS:
        return kernels.linear_bf16(x, self)
    bias = None if self._bias is None else self._bias.float()
    return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def _matrix_decode(self, x: np.ndarray) -> np.ndarray:  # [M, I] float32 -> [M, O] float32
    return kernels._gemv(np.ascontiguousarray(x, np.float32), self)


if not MERGED:
    class Projection(Protocol):
        shape: tuple[int, int]
        nbytes: int

        def matmul(self, x: torch.Tensor) -> torch.Tensor: ...

    kernels.Projection = Projection
    kernels.stack = _stack
    kernels.Matrix.shape = property(lambda self: tuple(self.weight.shape))
    kernels.Matrix.nbytes = property(
        lambda self: self.weight.nbytes + (0 if self._bias is None else self._bias.nbytes))
    kernels.Matrix.matmul = _matrix_matmul
    kernels.Matrix.decode = _matrix_decode
