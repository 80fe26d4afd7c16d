"""What a stage tells the scheduler about the model and itself before it serves anything:
sizes read from the checkpoint's headers (no weights loaded) and a quick speed probe."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import torch

from parallax.broker.hub import safetensors_header
from parallax.broker.model import gguf_file, read_config
from parallax.broker.registry import ModelProfile

from . import int4pack
from .gguf_weights import FLOAT_TYPES, GGUFWeights
from .models import architecture
from .torch_backend import DTYPES, QUANTIZE, checkpoint_index

_STORED_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1}  # safetensors dtypes a stage keeps as stored (U8: MXFP4)


def model_profile(path: Path, dtype: str, quantize: str | None = None) -> ModelProfile:
    """Bytes of each decoder layer (dense and mixture-of-experts layers differ; ``layer_bytes``: the
    largest), of the embeddings and of norm + lm_head, as a stage holds them:
    matrices as stored (GGUF blocks, bf16/fp16 tensors; float32 ones in a bf16/fp16 serving dtype, else
    float32), or in the ``quantize`` format
    ("q8_0", "q4_0") when float matrices are quantized at load; vectors (norms, biases) and the KV
    cache in the serving dtype. Q4_0/Q4_K blocks that a bf16 stage may hold in torch's int4 layout
    (``stages.int4pack``: 20 bytes per 32 weights instead of 18) count at that size: the most it holds.
    KV: bytes of one position in one layer, and each layer's sliding window (a stage keeps at most that many
    positions of a request there: ``ModelProfile.kv_reserve``)."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}; got {quantize!r}")
    config = read_config(path)
    args = architecture(config).ModelArgs.from_dict(config)
    size = torch.empty((), dtype=DTYPES[dtype]).element_size()
    held = _held_bytes(path, DTYPES[dtype], quantize, args.keeps_float32)
    layers = [0] * args.num_hidden_layers
    for name, n in held.items():
        index = int(name.split(".", 3)[2]) if name.startswith("model.layers.") else -1
        if 0 <= index < len(layers):  # (not a layer beyond the decoder's, e.g. a multi-token-prediction one)
            layers[index] += n
    embed = held.get("model.embed_tokens.weight", 0)
    head = held.get("lm_head.weight", embed) + held.get("model.norm.weight", 0)
    kv_heads, k_dim, v_dim = args.kv_dims
    windows = tuple(args.window(i) or 0 for i in range(args.num_hidden_layers))
    return ModelProfile(num_layers=args.num_hidden_layers, layer_bytes=max(layers), first_bytes=embed,
                        last_bytes=head, kv_bytes_per_token=kv_heads * (k_dim + v_dim) * size,
                        layer_bytes_list=tuple(layers), kv_windows=windows if any(windows) else None)


def _held_bytes(path: Path, dtype: torch.dtype, quantize: str | None,
                keeps_float32: Callable[[str], bool]) -> dict[str, int]:
    """HF tensor name -> bytes a stage holds for it (at most)."""
    held, size = {}, torch.empty((), dtype=dtype).element_size()
    tensors = _tensors(Path(path))
    for name, (shape, stored, is_float, qtype) in tensors.items():
        numel = math.prod(shape)
        if keeps_float32(name):
            held[name] = numel * 4
        elif qtype is None and stored is not None and not is_float:
            held[name] = stored  # raw bytes kept as stored (MXFP4 blocks and scales)
        elif name.endswith("bias") and _in_blocks(tensors.get(_weight_of(name)), quantize):
            held[name] = numel * 4  # the bias of a matrix held as GGUF blocks: float32 (``quant.QuantMatrix``)
        elif len(shape) not in (2, 3) or name.endswith("bias"):
            held[name] = numel * size  # a vector (or stacked vectors: experts' biases), in the serving dtype
        elif quantize is not None and is_float:
            count, matrix = _matrices(shape)
            block, block_bytes = gguf.GGML_QUANT_SIZES[QUANTIZE[quantize]]
            blocks = matrix[0] * math.ceil(matrix[1] / block) * block_bytes
            held[name] = count * int4pack.most_bytes(QUANTIZE[quantize], matrix, dtype, blocks)
        elif stored is None:
            held[name] = numel * size
        elif is_float:  # as stored; a float32 matrix served in bf16/fp16 is cast once (torch_backend.WeightFormat)
            held[name] = min(stored, numel * size)
        else:
            held[name] = int4pack.most_bytes(qtype, shape, dtype, stored)
    return held


def _weight_of(bias: str) -> str:
    """The matrix a bias belongs to: ``x.bias`` -> ``x.weight``; fused experts' ``x_bias`` -> ``x``."""
    return bias[: -len(".bias")] + ".weight" if bias.endswith(".bias") else bias[: -len("_bias")]


def _in_blocks(weight: "Tensor | None", quantize: str | None) -> bool:
    """Whether a stage holds this weight as GGUF blocks: a GGUF-quantized one, or a float matrix with --quantize."""
    if weight is None:
        return False
    shape, _, is_float, qtype = weight
    return (qtype is not None and not is_float) or (quantize is not None and is_float and len(shape) in (2, 3))


def _matrices(shape: tuple[int, ...]) -> tuple[int, tuple[int, int]]:
    """How many matrices [O, I] a 2-D or 3-D tensor holds: a 2-D one itself; a 3-D one [E, I, O] is E experts'
    matrices, transposed (transformers' fused experts, as gpt-oss stores them; loaded one expert at a time)."""
    return (1, (shape[0], shape[1])) if len(shape) == 2 else (shape[0], (shape[2], shape[1]))


Tensor = tuple[tuple[int, ...], "int | None", bool, "gguf.GGMLQuantizationType | None"]


def _tensors(path: Path) -> dict[str, Tensor]:
    """name -> (shape, bytes as stored or None when a stage converts it to the serving dtype, float or not,
    the GGUF type of a GGUF source)."""
    gguf_path = gguf_file(path)
    if gguf_path is not None:
        weights = GGUFWeights.open(gguf_path)
        return {name: (weights.shape(name), weights.stored_bytes(name), weights.qtype(name) in FLOAT_TYPES,
                       weights.qtype(name)) for name in weights.names()}
    by_file: dict[str, list[str]] = {}
    for name, file in checkpoint_index(path).items():
        by_file.setdefault(file, []).append(name)
    found = {}
    for file, names in by_file.items():
        header = safetensors_header(path, file)  # the file's, or the Hub's for a shard this stage did not fetch
        for name in names:
            shape, kind = tuple(header[name]["shape"]), header[name]["dtype"]
            stored = math.prod(shape) * _STORED_SIZES[kind] if kind in _STORED_SIZES else None
            found[name] = (shape, stored, kind.startswith(("F", "BF")), None)
    return found


def estimate_layer_ms(profile: ModelProfile, hidden_size: int, dtype: str, device: str, budget_s: float = 0.05) -> float:
    """Decode time of one layer at batch 1, estimated by a matrix-vector product over as many
    weight bytes as a layer has (decode is bound by reading weights): the median of as many runs
    as fit in ``budget_s`` (at least 5), so that tiny layers are not all noise."""
    dt = DTYPES[dtype]
    rows = max(1, profile.layer_bytes // (hidden_size * torch.empty((), dtype=dt).element_size()))
    w = torch.randn(rows, hidden_size, dtype=dt, device=device)  # w: [R, D]
    x = torch.randn(1, hidden_size, dtype=dt, device=device)  # x: [1, D]
    times: list[float] = []
    with torch.inference_mode():
        torch.nn.functional.linear(x, w)  # warm-up
        end = time.perf_counter() + budget_s
        while len(times) < 5 or (time.perf_counter() < end and len(times) < 10_000):
            started = time.perf_counter()
            torch.nn.functional.linear(x, w)
            if w.device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)
