"""A GGUF file's tensors under their Hugging Face names, in the format they are stored in.

``GGUFWeights.open`` scans the header only (scalars and the tensor table, see ``_scan``); ``get`` reads one tensor's bytes
from the file into heap memory (``readinto``, never a view of a memory map: the model
concatenates q/k/v and gate/up, and pages touched through a map would count twice in RSS):

* quantized matrices (``quant.TYPES``) -> :class:`QuantMatrix` over their blocks, uint8 [O, bytes per row];
* float matrices -> torch tensors as stored (F16 -> float16, BF16 -> bfloat16, F32 -> float32);
* 1-D float tensors (norms, biases) -> torch tensors in the dtype asked for.

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

from .models import UnsupportedModel, UsageError
from .quant import TYPES, QuantMatrix

Q = gguf.GGMLQuantizationType
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
ARCHITECTURES = ("llama", "qwen2", "qwen3")  # GGUF general.architecture values served (Mistral is "llama")
MOE_ARCHITECTURES = ("qwen3moe", "qwen2moe", "mixtral")  # refused with a pointer to the HF checkpoint (Mixtral
# GGUFs usually say "llama" with an expert count: refused by that count)
PERMUTED = ("llama",)  # architectures whose q/k rows llama.cpp's converter permutes

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


class GGUFWeights:
    """Read-only access to a GGUF file's tensors by HF name."""

    def __init__(self, path: Path, architecture: str, tensors: dict[str, _Tensor]):
        self.path = path
        self.architecture = architecture
        self._tensors = tensors

    @classmethod
    def open(cls, path: Path | str) -> GGUFWeights:
        path = Path(path)
        try:
            fields, infos = _scan(path)
        except (OSError, ValueError, struct.error) as exc:
            raise UnsupportedModel(f"cannot read GGUF file {path}: {exc}") from exc
        arch = _field(fields, "general.architecture")
        if arch in MOE_ARCHITECTURES or int(_field(fields, f"{arch}.expert_count", 0) or 0) > 0:
            raise UsageError(f"{path.name} is a mixture-of-experts GGUF ({arch}), which is not served from GGUF "
                             "(its experts are stored as 3-D tensors): serve the Hugging Face checkpoint "
                             "(safetensors) instead, with --quantize q8_0 or q4_0 to hold it in blocks")
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
