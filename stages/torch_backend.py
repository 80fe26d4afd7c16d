"""PyTorch backend: loads only its layers (safetensors or GGUF, each weight held once as stored) and
runs them on CPU or CUDA."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import gguf
import torch
from safetensors import safe_open

from parallax.broker.errors import UsageError
from parallax.broker.model import gguf_file

from . import kernels
from .backend import StageSpec, StepItem, StepOutput
from .blocks import kv_groups
from .kv import GroupedKV, KVCache, KVPool, Rows
from .models import QUANTIZE_TYPES, UnsupportedModel, already_quantized, architecture
from .gguf_weights import GGUFWeights
from .mxfp4 import MXFP4Matrix
from .quant import QuantMatrix
from .sampling import Sampler, sample_step

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int32": torch.int32}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class TorchBackend:
    def __init__(self, model: torch.nn.Module, spec: StageSpec):
        self.model, self.spec = model, spec
        self.device, self.dtype = torch.device(spec.device), DTYPES[spec.dtype]
        kv_heads, k_dim, self._v_dim = model.args.kv_dims
        self._kv_shape = (len(model.layers), kv_heads, k_dim)
        self.kv_windows = tuple(layer.self_attn.window for layer in model.layers)
        self.kv: KVCache | None = None
        self.sampler = Sampler()
        self.kernels: dict[str, str] = model.kernel_picks  # chosen by the kernel tuning at load

    @classmethod
    def load(cls, path: Path, model_name: str, start: int, end: int, dtype: str, device: str | None = None,
             quantize: str | None = None) -> "TorchBackend":
        config = json.loads((Path(path) / "config.json").read_text())
        model = load_stage_model(Path(path), config, start, end, DTYPES[dtype], torch.device(device or default_device()),
                                 quantize)
        args = model.args
        spec = StageSpec(
            model_name, start, end, args.num_hidden_layers, args.hidden_size, args.vocab_size,
            args.max_position_embeddings, dtype, device or default_device(),
        )
        return cls(model, spec)

    def kv_block_bytes(self, block_size: int) -> int:
        return KVPool.bytes_per_block(*self._kv_shape, block_size, self.dtype, self._v_dim)

    def init_kv(self, num_blocks: int, block_size: int, group_blocks: tuple[int, ...] = ()) -> None:
        if not group_blocks:
            self.kv = KVPool(*self._kv_shape, num_blocks, block_size, self.dtype, self.device, self._v_dim)
            return
        groups = kv_groups(self.kv_windows)
        if len(groups) != 1 + len(group_blocks):
            raise ValueError(f"this stage's layers form {len(groups)} KV groups; got the sizes of {1 + len(group_blocks)}")
        self.kv = GroupedKV([g.layers for g in groups], (num_blocks, *group_blocks), *self._kv_shape[1:], block_size,
                            self.dtype, self.device, self._v_dim)

    def run(self, items: list[StepItem]) -> StepOutput:
        groups = self._groups(items)
        outs = [self._forward([items[i] for i in g]) for g in groups]
        out = outs[0] if len(groups) == 1 else _in_item_order(items, groups, outs, self.spec.last)
        if not self.spec.last:
            return StepOutput(_to_bytes(out), out.shape[1] * out.element_size(), ())
        return sample_step(self.sampler, out, items)  # out: [R, V], each item's ``outputs`` rows

    def _groups(self, items: list[StepItem]) -> list[list[int]]:
        """Item indices per forward. Where the model has a fused path, generated tokens run apart
        from prompt rows, ``decode_group`` at a time (the fused path computes every row on its own,
        prompt rows with other projections than generated tokens: a row's result never depends on
        what else is in the step)."""
        size = self.model.decode_group
        if not size:
            return [list(range(len(items)))]
        decode = [i for i, item in enumerate(items) if not item.prompt]
        prompt = [i for i, item in enumerate(items) if item.prompt]
        groups = [decode[k : k + size] for k in range(0, len(decode), size)]
        return groups + [prompt] if prompt else groups

    def _forward(self, items: list[StepItem]) -> torch.Tensor:
        x = self._inputs(items)  # [T] ids or [T, D] hidden
        parts = [(i.blocks, i.pos, i.n, i.outputs) for i in items]
        more = [i.group_blocks for i in items] if items[0].group_blocks else ()
        rows = Rows.build(parts, self.kv.block_size, self.device, prompt=all(i.prompt for i in items), more=more)
        with torch.inference_mode():
            return self.model(x, rows, self.kv)

    def release(self, rid: str) -> None:
        self.sampler.release(rid)

    def _inputs(self, items: list[StepItem]) -> torch.Tensor:
        if self.spec.first:
            ids = torch.frombuffer(bytearray().join(i.data for i in items), dtype=torch.int32)
            return ids.to(self.device, torch.long)
        wire = DTYPES[items[0].dtype]
        raw = torch.frombuffer(bytearray().join(i.data for i in items), dtype=torch.uint8)
        return raw.view(wire).view(-1, self.spec.hidden_size).to(self.device, self.dtype)


def _in_item_order(items: list[StepItem], groups: list[list[int]], outs: list[torch.Tensor], last: bool) -> torch.Tensor:
    """Rows of several forwards back in item order: each item's n hidden rows, or its ``outputs`` logits
    rows (last stage)."""
    pieces: dict[int, torch.Tensor] = {}
    for group, out in zip(groups, outs):
        sizes = [items[i].outputs if last else items[i].n for i in group]
        pieces.update(zip(group, out.split(sizes)))
    return torch.cat([pieces[i] for i in range(len(items))])


def _to_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().cpu().view(torch.uint8).numpy()).cast("B")


QUANTIZE = {name: gguf.GGMLQuantizationType[name.upper()] for name in QUANTIZE_TYPES}


def load_stage_model(path: Path, config: dict, start: int, end: int, dtype: torch.dtype, device: torch.device,
                     quantize: str | None = None):
    """Build layers start:end and load only their tensors, each held once in its stored format (see
    ``WeightFormat``); ``quantize`` ("q8_0", "q4_0") turns a dense checkpoint's matrices into blocks."""
    arch = architecture(config)
    args = arch.ModelArgs.from_dict(config)
    if not 0 <= start < end <= args.num_hidden_layers:
        raise ValueError(f"layers {start}:{end} are outside 0:{args.num_hidden_layers} of this model")
    weights = open_weights(path)
    fmt = WeightFormat(dtype, device, quantize_type(quantize, weights, device))
    with torch.device("meta"):
        model = arch.StageModel(args, start, end)
    model.load(_read_tensors(model.source(weights), model, args, fmt), dtype)
    model.inv_freq, model.attention_scaling = _rope(path, args.dim_head, device)
    model.fuse()
    if model.fused:
        kernels.warm_up()
    model.kernel_picks = kernels.tune(kernels.projections(model), dtype) if device.type == "cpu" else {}
    if model.fused:
        model.warm_up()
    release_free_memory()
    log.info("loaded layers %d:%d of %s (%s weights, %.1f MB as held)", start, end, path,
             quantize or "stored", model.weight_bytes / 1e6)
    return model.eval()


def release_free_memory() -> None:
    """Hand the heap memory that loading freed (quantizing's float32 temporaries, tuning's test inputs)
    back to the OS: glibc keeps freed blocks below its mmap threshold in the process otherwise, and a
    stage's RSS would stay tens of MB above what it holds (measured: --quantize q4_0 of a 140 M model,
    +90 MB)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def quantize_type(quantize: str | None, weights: "TensorSource", device: torch.device):
    """--quantize checked against the source and device: the block type, or None."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE:
        raise UsageError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZE)}")
    if isinstance(weights, GGUFSource):
        raise already_quantized(weights.file.name)
    if device.type != "cpu":
        raise UsageError(f"--quantize needs --device cpu (the quantized kernels are CPU kernels), not {device}")
    return QUANTIZE[quantize]


@dataclass(frozen=True)
class WeightFormat:
    """How a loaded tensor is held. Matrices (2-D) on CPU: a quantized one as its blocks; bf16/fp16 as
    stored; float32 as float32 when activations are float32, else cast once to the activation dtype
    (replacing the float32 tensor: one copy, half the bytes); with ``quantize``, quantized one tensor
    at a time. On CUDA (no quantized kernels there) everything is dense in the activation dtype.
    Vectors (norms, biases): the activation dtype."""

    dtype: torch.dtype  # activations and KV
    device: torch.device
    quantize: gguf.GGMLQuantizationType | None = None

    def matrix(self, name: str, w: "torch.Tensor | QuantMatrix | MXFP4Matrix") -> "torch.Tensor | QuantMatrix | MXFP4Matrix":
        if isinstance(w, MXFP4Matrix):  # kept as stored on any device (its product decodes a tile at a time)
            return w.to(self.device)
        if isinstance(w, QuantMatrix):
            if self.device.type == "cpu":
                return w
            return w.dequantize_rows(0, w.shape[0]).to(self.device, self.dtype)  # [O, I]
        if self.quantize is not None:
            try:
                return QuantMatrix.quantize(w, self.quantize)
            except ValueError as exc:
                raise UsageError(f"--quantize {self.quantize.name.lower()}: {name} {list(w.shape)}: {exc}") from None
        if self.device.type != "cpu":
            return w.to(self.device, self.dtype)
        if w.dtype in (torch.bfloat16, torch.float16):
            return w
        return w.to(self.dtype if self.dtype in (torch.bfloat16, torch.float16) else torch.float32)

    def vector(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype)


class TensorSource(Protocol):
    """A checkpoint's tensors by HF name (safetensors here, GGUF in ``gguf_weights``)."""

    def names(self) -> set[str]: ...

    def get(self, name: str, dtype: torch.dtype) -> "torch.Tensor | QuantMatrix | MXFP4Matrix": ...


class SafetensorsWeights:
    """An HF folder's safetensors (memory-mapped): matrices as stored, vectors in ``dtype``."""

    def __init__(self, path: Path):
        self.path, self.files = path, checkpoint_index(path)

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        with safe_open(self.path / self.files[name], framework="pt", device="cpu") as f:
            t = f.get_tensor(name)
        return t if t.dim() == 2 else t.to(dtype, copy=True)  # a vector never pins the file's mapping


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file's tensors (``stages.gguf_weights``), quantized ones as QuantMatrix blocks."""

    file: Path
    weights: GGUFWeights

    def names(self) -> set[str]:
        return self.weights.names()

    def get(self, name: str, dtype: torch.dtype) -> "torch.Tensor | QuantMatrix":
        return self.weights.get(name, dtype)


def open_weights(path: Path) -> TensorSource:
    """The folder's GGUF (``broker.model.gguf_file``) when it serves from one, else its safetensors."""
    file = gguf_file(path)
    if file is None:
        return SafetensorsWeights(path)
    return GGUFSource(Path(file), GGUFWeights.open(file))


def _read_tensors(weights: TensorSource, model, args, fmt: WeightFormat) -> dict:
    """Our name -> tensor or QuantMatrix, converted by ``fmt`` (dense float32 where ``args.keeps_float32``);
    a tied head gets the embedding's own object when the stage holds both, else the embedding's tensor read
    for it (one object either way)."""
    have = weights.names()
    wanted = model.tensor_names()
    if args.tie_word_embeddings and "lm_head.weight" in wanted and "lm_head.weight" not in have:
        wanted["lm_head.weight"] = "model.embed_tokens.weight"
    missing = sorted(src for src in wanted.values() if src not in have)
    if missing:
        raise UnsupportedModel(f"checkpoint lacks tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    by_source: dict[str, object] = {}
    for name, src in wanted.items():
        if src in by_source:
            continue
        if args.keeps_float32(src):
            t = weights.get(src, torch.float32)
            dense = t.dequantize_rows(0, t.shape[0]) if isinstance(t, QuantMatrix) else t
            by_source[src] = dense.to(fmt.device, torch.float32)
        else:
            t = weights.get(src, fmt.dtype)
            matrix = isinstance(t, (QuantMatrix, MXFP4Matrix)) or t.dim() == 2
            form = fmt if args.quantizable(src) else replace(fmt, quantize=None)
            by_source[src] = form.matrix(src, t) if matrix else form.vector(t)
    return {name: by_source[src] for name, src in wanted.items()}


def checkpoint_index(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file, from model.safetensors.index.json or the single file."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"no .safetensors files in {path}")
    names: dict[str, str] = {}
    for file in files:
        with safe_open(path / file, framework="pt") as f:
            names.update(dict.fromkeys(f.keys(), file))
    return names


def _rope(path: Path, head_dim: int, device: torch.device) -> tuple[torch.Tensor, float]:
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(path)
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv.to(device), 1.0
    if kind in ("dynamic", "longrope"):
        raise UnsupportedModel(f"rope_type {kind!r} depends on the sequence length and is not supported yet")
    inv, scaling = ROPE_INIT_FUNCTIONS[kind](config, device)
    return inv.to(device), float(scaling)
