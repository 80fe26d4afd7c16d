"""A GGUF file's tensors under their Hugging Face names, in the format they are stored in.

``GGUFWeights.open`` scans the header only (scalars and the tensor table, see ``_scan``); ``get`` reads one tensor's bytes
from the file into heap memory (``readinto``, never a view of a memory map: the model
concatenates q/k/v and gate/up, and pages touched through a map would count twice in RSS), except
quantized experts (below):

* quantized matrices (``quant.TYPES``) -> :class:`QuantMatrix` over their blocks, uint8 [O, bytes per row];
* float matrices -> torch tensors as stored (F16 -> float16, BF16 -> bfloat16, F32 -> float32);
* 1-D float tensors (norms, biases) -> torch tensors in the dtype asked for.

Mixture-of-experts GGUFs (``qwen3moe``; Mixtral, which llama.cpp writes as ``llama`` with an
``expert_count``) hold each layer's experts as three 3-D tensors, ``ffn_{gate,up,down}_exps`` [E, O, I],
and the router as ``ffn_gate_inp`` [E, D]. Each expert is listed under its HF name
(``model.layers.N.mlp.experts.E.gate_proj.weight``; Mixtral's ``block_sparse_moe.experts.E.w1.weight``)
as one 2-D matrix: a quantized one is a QuantMatrix over its slice of the file, memory-mapped (no copy:
the MoE layer keeps an expert's gate and up apart instead of stacking them, ``models.moe``), its pages
read from the file when first used; a float one is read like any float matrix. The router is an ordinary
matrix, as stored.

GGUF names map to HF names through gguf's own table (``gguf.get_tensor_name_map``). llama.cpp's
converter permutes the rows of q and k for llama-architecture models (``LlamaModel.permute``: each
head's two rotary halves interleaved); that is undone here, on rows of bytes, so rows of quantized
blocks move exactly like rows of floats (as transformers' ``LlamaTensorProcessor`` does on floats).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from .models import UnsupportedModel
from .quant import TYPES, QuantMatrix

Q = gguf.GGMLQuantizationType
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe")  # GGUF general.architecture values served (Mistral and
# Mixtral are "llama", Mixtral with an expert count)
PERMUTED = ("llama",)  # architectures whose q/k rows llama.cpp's converter permutes
# GGUF architecture -> the HF module of a layer's experts and router, and its (gate, up, down) projections' names
EXPERTS = {"qwen3moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
           "llama": ("block_sparse_moe", ("w1", "w3", "w2"))}

# HF module names (without ".weight" / ".bias") that the stage models use; gguf's table gives their GGUF names.
GLOBAL_MODULES = ("model.embed_tokens", "model.norm", "lm_head")
LAYER_MODULES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "input_layernorm", "post_attention_layernorm",
)


@dataclass(frozen=True)
class _Tensor:
    """Where one tensor lies in the file and what it holds."""

    gguf_name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: (O, I) for a matrix, (N,) for a vector
    offset: int  # absolute byte offset in the file
    nbytes: int
    heads: int | None  # llama.cpp permuted these rows in groups of `heads` heads; None: rows as in HF
    expert: bool = False  # one expert's matrix, a slice of a 3-D tensor (quantized: memory-mapped)


class GGUFWeights:
    """Read-only access to a GGUF file's tensors by HF name."""

    def __init__(self, path: Path, architecture: str, tensors: dict[str, _Tensor]):
        self.path = path
        self.architecture = architecture
        self._tensors = tensors
        self._map: np.memmap | None = None  # the whole file, read-only, mapped once an expert is asked for

    @classmethod
    def open(cls, path: Path | str) -> GGUFWeights:
        path = Path(path)
        try:
            fields, infos = _scan(path)
        except (OSError, ValueError, struct.error) as exc:
            raise UnsupportedModel(f"cannot read GGUF file {path}: {exc}") from exc
        arch = _field(fields, "general.architecture")
        if arch not in ARCHITECTURES:
            raise UnsupportedModel(f"GGUF architecture {arch!r} of {path} is not supported "
                                   f"(have: {', '.join(ARCHITECTURES)})")
        layers = int(_field(fields, f"{arch}.block_count"))
        heads = int(_field(fields, f"{arch}.attention.head_count"))
        kv_heads = int(_field(fields, f"{arch}.attention.head_count_kv", heads))
        by_gguf_name = {info[0]: info for info in infos}
        names = gguf.get_tensor_name_map(_arch_enum(arch), layers)
        modules = list(GLOBAL_MODULES) + [f"model.layers.{i}.{m}" for i in range(layers) for m in LAYER_MODULES]
        permuted = {"self_attn.q_proj": heads, "self_attn.k_proj": kv_heads} if arch in PERMUTED else {}
        tensors: dict[str, _Tensor] = {}
        for module in modules:
            groups = next((h for m, h in permuted.items() if module.endswith(m)), None)
            base = names.get_name(module)
            for suffix in (".weight", ".bias"):
                found = by_gguf_name.get(f"{base}{suffix}") if base is not None else None
                if found is None:
                    continue
                tensors[module + suffix] = _describe(found, groups)
        if arch == "qwen3moe" or int(fields.get(f"{arch}.expert_count", 0)):  # (Mixtral: llama with experts)
            count = int(_field(fields, f"{arch}.expert_count"))
            tensors.update(_expert_tensors(path, arch, count, layers, names, by_gguf_name))
        return cls(path, arch, tensors)

    def names(self) -> set[str]:
        """HF tensor names ("model.layers.3.self_attn.q_proj.weight", ...); "lm_head.weight" only if stored."""
        return set(self._tensors)

    def shape(self, hf_name: str) -> tuple[int, ...]:
        """Torch-order shape: (out_features, in_features) for a matrix."""
        return self._entry(hf_name).shape

    def qtype(self, hf_name: str) -> gguf.GGMLQuantizationType:
        """The GGUF type the tensor is stored as (F32, F16, BF16 or a quantized block type)."""
        return self._entry(hf_name).qtype

    def stored_bytes(self, hf_name: str) -> int:
        """The tensor's bytes in the file."""
        return self._entry(hf_name).nbytes

    def get(self, hf_name: str, dtype: torch.dtype) -> torch.Tensor | QuantMatrix:
        """A quantized matrix as QuantMatrix, a float matrix as stored, a vector in ``dtype``."""
        t = self._entry(hf_name)
        if t.qtype not in FLOAT_TYPES and t.qtype not in TYPES:
            raise UnsupportedModel(f"tensor {hf_name} ({t.gguf_name}) of {self.path} is stored as {t.qtype.name}, "
                                   f"which is not supported; supported: "
                                   f"{', '.join(q.name for q in (*FLOAT_TYPES, *TYPES))}")
        if len(t.shape) not in (1, 2) or (len(t.shape) == 1 and t.qtype not in FLOAT_TYPES):
            raise UnsupportedModel(f"tensor {hf_name} ({t.gguf_name}) of {self.path} has shape {list(t.shape)} "
                                   f"stored as {t.qtype.name}; expected a matrix, or a float vector")
        if t.expert and t.qtype in TYPES:
            return QuantMatrix(t.qtype, t.shape, self._mapped(t))
        rows = self._read(t)  # uint8 [rows, bytes per row], HF row order
        if t.qtype in TYPES:
            return QuantMatrix(t.qtype, t.shape, rows)
        tensor = torch.from_numpy(rows).view(FLOAT_TYPES[t.qtype]).reshape(t.shape)  # zero-copy reinterpretation
        return tensor.to(dtype) if len(t.shape) == 1 else tensor

    def _entry(self, hf_name: str) -> _Tensor:
        try:
            return self._tensors[hf_name]
        except KeyError:
            raise UnsupportedModel(f"GGUF file {self.path} has no tensor for {hf_name}") from None

    def _mapped(self, t: _Tensor) -> np.ndarray:
        """The tensor's bytes in the memory-mapped file (read-only, no copy): uint8 [rows, bytes per row]."""
        if self._map is None:
            self._map = np.memmap(self.path, np.uint8, mode="r")
        if t.offset + t.nbytes > self._map.size:
            raise UnsupportedModel(f"GGUF file {self.path} is truncated inside tensor {t.gguf_name}")
        return self._map[t.offset : t.offset + t.nbytes].reshape(t.shape[0], -1)

    def _read(self, t: _Tensor) -> np.ndarray:
        """The tensor's bytes, read into a fresh heap array: uint8 [rows, bytes per row], q/k un-permuted."""
        data = np.empty(t.nbytes, np.uint8)
        view, done = memoryview(data), 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(t.offset)
            while done < t.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise UnsupportedModel(f"GGUF file {self.path} is truncated inside tensor {t.gguf_name}")
                done += n
        rows = data.reshape(t.shape[0], -1)  # a vector: one row per element
        return _unpermute(rows, t.heads) if t.heads else rows


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's ``reshape(heads, 2, d/2, ...).swapaxes(1, 2)`` on rows: [O, B] -> [O, B], a new array."""
    O, B = rows.shape
    if O % (2 * heads):
        raise UnsupportedModel(f"{O} rows of q/k do not split into {heads} heads of two rotary halves")
    out = np.empty_like(rows)
    out.reshape(heads, 2, O // heads // 2, B)[:] = rows.reshape(heads, O // heads // 2, 2, B).swapaxes(1, 2)
    return out


def _describe(info: tuple[str, tuple[int, ...], int, int], heads: int | None) -> _Tensor:
    name, dims, kind, offset = info
    qtype = Q(kind)
    shape = tuple(reversed(dims))  # ggml lists the fastest dimension first
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return _Tensor(name, qtype, shape, offset, math.prod(dims) // block * size, heads)


def _expert_tensors(path: Path, arch: str, count: int, layers: int, names: gguf.TensorNameMap,
                    by_gguf_name: dict) -> dict[str, _Tensor]:
    """HF name -> tensor of every layer's router and of each expert's matrices (slices of the 3-D
    ``ffn_*_exps`` tensors [E, O, I], ``count`` experts each)."""
    if arch not in EXPERTS:
        raise UnsupportedModel(f"{path.name}: experts of GGUF architecture {arch!r} are not supported "
                               f"(have: {', '.join(EXPERTS)})")
    prefix, projections = EXPERTS[arch]
    tensors: dict[str, _Tensor] = {}
    def stored(module: str):  # the GGUF tensor of an HF module's weight, or None
        base = names.get_name(module)
        return None if base is None else by_gguf_name.get(f"{base}.weight")

    for i in range(layers):
        router = stored(f"model.layers.{i}.{prefix}.gate")
        if router is not None:
            tensors[f"model.layers.{i}.{prefix}.gate.weight"] = _describe(router, None)
        for proj in projections:
            found = stored(f"model.layers.{i}.{prefix}.experts.{proj}")  # all experts: ffn_{gate,up,down}_exps
            if found is None:
                continue
            whole = _describe(found, None)  # shape (E, O, I)
            if len(whole.shape) != 3 or whole.shape[0] != count:
                raise UnsupportedModel(f"{path.name}: {whole.gguf_name} has shape {list(whole.shape)}; expected "
                                       f"{count} experts' matrices [{count}, out, in] (expert_count {count})")
            each = whole.nbytes // count
            for e in range(count):
                tensors[f"model.layers.{i}.{prefix}.experts.{e}.{proj}.weight"] = _Tensor(
                    whole.gguf_name, whole.qtype, whole.shape[1:], whole.offset + e * each, each, None, expert=True)
    return tensors


def _field(fields: dict, key: str, default=None):
    if key not in fields:
        if default is None:
            raise UnsupportedModel(f"GGUF file lacks the metadata key {key}")
        return default
    return fields[key]


# --- the header -----------------------------------------------------------------------------------
# ``gguf.GGUFReader`` turns every metadata value into numpy objects, the tokenizer's ~100k strings too:
# ~170 MB at its peak for a 49k-token vocabulary, of which ~100 MB stayed in a stage's RSS for good
# (allocator fragmentation; measured). A stage needs a few numbers and the tensor table, so it scans the
# header itself: scalars kept, arrays skipped by their lengths (GGUF v2/v3 layout, little-endian).

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _scan(path: Path) -> tuple[dict, list[tuple[str, tuple[int, ...], int, int]]]:
    """(scalar metadata, [(tensor name, ggml dims, type, absolute data offset)]) of a GGUF file."""
    with open(path, "rb") as f:
        magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"not a GGUF v2/v3 file (magic {magic!r}, version {version})")
        fields = {}
        for _ in range(n_kv):
            key, kind = _string(f), _unpack(f, "<I")
            value = _value(f, kind)
            if value is not None:
                fields[key] = value
        infos = []
        for _ in range(n_tensors):
            name, ndims = _string(f), _unpack(f, "<I")
            dims = struct.unpack(f"<{ndims}Q", f.read(8 * ndims))
            kind, offset = struct.unpack("<IQ", f.read(12))
            infos.append((name, dims, kind, offset))
        align = int(fields.get("general.alignment", 32))
        start = -(-f.tell() // align) * align
    return fields, [(name, dims, kind, start + offset) for name, dims, kind, offset in infos]


def _unpack(f, fmt: str):
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _string(f) -> str:
    return f.read(_unpack(f, "<Q")).decode("utf-8", errors="replace")


def _value(f, kind: int):
    """A scalar or string value; an array is skipped (None)."""
    if kind == _STRING:
        return _string(f)
    if kind in _SCALARS:
        return _unpack(f, _SCALARS[kind])
    if kind != _ARRAY:
        raise ValueError(f"unknown GGUF metadata type {kind}")
    item, count = struct.unpack("<IQ", f.read(12))
    if item == _STRING:
        for _ in range(count):
            f.seek(_unpack(f, "<Q"), 1)
    elif item == _ARRAY:
        for _ in range(count):
            _value(f, _ARRAY)
    else:
        f.seek(count * struct.calcsize(_SCALARS[item]), 1)
    return None


def _arch_enum(arch: str) -> gguf.MODEL_ARCH:
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
