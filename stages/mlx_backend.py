"""MLX backend: a stage's layers as mlx-lm's decoder blocks (one module per ``model_type``, see
:mod:`.mlx_arch`), on Apple silicon (Metal) or, with ``mlx[cpu]``, on a Linux CPU (slow: for tests and
mixed pipelines).

The engine is the same as the torch backend's; only the compute differs. Each of mlx-lm's blocks
runs unchanged with a :class:`_PagedView` as its ``cache``: the view writes the step's keys/values
into this stage's paged pool (one array per layer, ``[blocks * block_size, KV, dim]``) at each row's
slot and hands back every request's own keys/values, gathered through its block table. Rows run in
groups, each a batch mlx-lm's attention takes as is:

* the decode group: every one-row item, ``[B, 1, D]``, with per-request rope offsets and a mask
  that hides each request's padding;
* one group per longer item (a prompt or a chunk of it at ``pos``), ``[1, n, D]``, causal after its
  ``pos`` cached positions.

A row's result never depends on the other rows of a step. Activations leave the stage as raw bytes
of its dtype (bf16 too), exactly like the torch backend's, so torch and MLX stages mix in one
pipeline. Sampling converts the last stage's logits to torch and reuses :mod:`.sampling`.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch
from mlx.utils import tree_flatten

from parallax.broker.errors import UnsupportedModel, UsageError
from parallax.broker.model import gguf_file

from .backend import StageSpec, StepItem, StepOutput
from .mlx_arch import architecture, sanitize
from .models import QUANTIZE_TYPES
from .sampling import Sampler, sample_step
from .torch_backend import checkpoint_index

log = logging.getLogger(__name__)
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
DEVICES = {"cpu": mx.cpu, "gpu": mx.gpu}
QUANTIZE_BITS = {"q8_0": 8, "q4_0": 4}  # --quantize on this backend: MLX affine quantization, groups of 32
GGUF_NATIVE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")  # GGUF types mx.load keeps exactly


def default_device() -> str:
    return "gpu" if mx.metal.is_available() else "cpu"


# --------------------------------------------------------------------------- the stage's modules


class StageModel(nn.Module):
    """Layers ``start:end`` as mlx-lm blocks (``layers[j]`` is the model's layer ``start + j``); the
    embedding on the first stage (and on a last stage whose head is tied to it), norm + head last."""

    def __init__(self, config: dict, start: int, end: int):
        super().__init__()
        found = architecture(config, start, end)
        arch, args = found.arch, found.args
        n = args.num_hidden_layers
        if not 0 <= start < end <= n:
            raise ValueError(f"layers {start}:{end} are outside 0:{n} of this model")
        self.found, self.arch, self.module, self.args = found, arch, found.module, args
        self.start, self.end, self.num_layers = start, end, n
        self.first, self.last, self.tied = start == 0, end == n, bool(config.get("tie_word_embeddings", False))
        if self.first or (self.last and self.tied):
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [arch.block(found.module, args, i) for i in range(start, end)]
        self.windows = found.windows  # each layer's sliding window (None: all keys before it)
        for layer in self.layers if found.rope is not None else ():
            layer.self_attn.rope = found.rope
        if self.last:
            self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
            if not self.tied:
                self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.heads = args.num_attention_heads
        self.kv_heads, self.k_dim, self.v_dim = found.kv  # what a position's cache entry holds
        self.hidden_size, self.vocab_size = args.hidden_size, args.vocab_size
        self.max_positions = getattr(args, "max_position_embeddings", None) or 4096

    def checkpoint_name(self, name: str) -> str:
        """Our parameter name -> the checkpoint's (HF naming: ``layers.j`` is ``model.layers.{start + j}``)."""
        if name.startswith("layers."):
            _, j, rest = name.split(".", 2)
            return f"model.layers.{self.start + int(j)}.{rest}"
        return name if name.split(".")[0] == "lm_head" else f"model.{name}"

    def head(self, h: mx.array) -> mx.array:  # [S, D] -> [S, V]
        h = self.norm(h)
        return self.embed_tokens.as_linear(h) if self.tied else self.lm_head(h)


# --------------------------------------------------------------------------- loading


def load_stage_model(path: Path, config: dict, start: int, end: int, dtype: mx.Dtype,
                     quantize: str | None = None) -> StageModel:
    """Build layers start:end and load only their tensors: dense ones in the activation ``dtype``,
    quantized ones (an MLX checkpoint's ``quantization``, a GGUF's Q4_0/Q4_1/Q8_0 blocks) as stored;
    ``quantize`` ("q8_0", "q4_0") quantizes a dense checkpoint's matrices with MLX (groups of 32)."""
    model = StageModel(config, start, end)
    gguf = gguf_file(path)
    if quantize is not None and quantize not in QUANTIZE_BITS:
        raise UsageError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZE_TYPES)}")
    if gguf is not None:
        if not model.arch.gguf:
            raise UnsupportedModel(f"{gguf.name}: the MLX backend reads GGUF files of dense models only; "
                                   "use --backend torch")
        if quantize is not None:
            from .models import already_quantized

            raise already_quantized(gguf.name)
        tensors = _gguf_tensors(gguf, model)
    else:
        tensors = _safetensors(path, model)
    tensors = sanitize(model.found, start, tensors)
    _quantize_like(model, tensors, config.get("quantization"))
    wanted = dict(tree_flatten(model.parameters()))
    missing = sorted(model.checkpoint_name(k) for k in wanted if model.checkpoint_name(k) not in tensors)
    if missing:
        raise UnsupportedModel(f"checkpoint lacks tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    model.load_weights([(k, _held(k, tensors[model.checkpoint_name(k)], dtype)) for k in wanted], strict=True)
    if quantize is not None:
        nn.quantize(model, group_size=32, bits=QUANTIZE_BITS[quantize])
    mx.eval(model.parameters())
    model.eval()
    log.info("loaded layers %d:%d of %s on MLX (%s weights)", start, end, path, quantize or "stored")
    return model


def _held(name: str, t: mx.array, dtype: mx.Dtype) -> mx.array:
    """A dense float tensor in the activation dtype; quantized data (uint32) as stored, its scales and
    biases too unless activations are float32 (cast exactly then: an embedding row dequantized in
    f16 would be rounded). f16 scales cast to bf16 would lose 3 bits: MLX computes with the stored
    ones and each layer's output is cast to the activation dtype."""
    if not mx.issubdtype(t.dtype, mx.floating):
        return t
    if name.endswith((".scales", ".biases")) and dtype != mx.float32:
        return t
    return t.astype(dtype)


def _stage_names(model: StageModel, available) -> set[str]:
    """Checkpoint names this stage may read (its layers, and embed/norm/head where it holds them)."""
    prefixes = tuple(f"model.layers.{i}." for i in range(model.start, model.end))
    glob = (("model.embed_tokens.",) if "embed_tokens" in model else ()) + (
        ("model.norm.", "lm_head.") if model.last else ())
    return {k for k in available if k.startswith(prefixes + glob)}


def _safetensors(path: Path, model: StageModel) -> dict[str, mx.array]:
    """The stage's tensors from the folder's safetensors files (mx.load maps them lazily)."""
    index = checkpoint_index(Path(path))
    names = _stage_names(model, index)
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(index[name], []).append(name)
    out = {}
    for file, wanted in by_file.items():
        arrays = mx.load(str(Path(path) / file))
        out.update({k: arrays[k] for k in wanted})
    return out


def _gguf_tensors(file: Path, model: StageModel) -> dict[str, mx.array]:
    """A GGUF's tensors under HF names: quantized matrices as MLX (weight, scales, biases) of groups
    of 32, floats as stored; q/k rows of a llama GGUF un-permuted (llama.cpp interleaves each head's
    rotary halves). Types MLX would not keep exactly are refused."""
    import gguf as ggufpy

    from .gguf_weights import GLOBAL_MODULES, LAYER_MODULES, PERMUTED, GGUFWeights

    info = GGUFWeights.open(file)
    for name in info.names():
        if info.qtype(name).name not in GGUF_NATIVE:
            raise UsageError(f"{file.name}: {name} is stored as {info.qtype(name).name}, which the MLX backend "
                             f"cannot serve exactly (it keeps {', '.join(GGUF_NATIVE)}); add --dequantize")
    try:
        arrays = mx.load(str(file))
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"MLX cannot read {file.name} ({exc}); add --dequantize") from None
    arch = info.architecture
    n = model.num_layers
    names = ggufpy.get_tensor_name_map(next(k for k, v in ggufpy.MODEL_ARCH_NAMES.items() if v == arch), n)
    heads = {"self_attn.q_proj": model.heads, "self_attn.k_proj": model.kv_heads}
    modules = list(GLOBAL_MODULES) + [f"model.layers.{i}.{m}" for i in range(n) for m in LAYER_MODULES]
    out = {}
    for module in modules:
        base = names.get_name(module)
        for suffix in ("weight", "bias", "scales", "biases"):
            found = arrays.get(f"{base}.{suffix}") if base is not None else None
            if found is None:
                continue
            groups = next((h for m, h in heads.items() if module.endswith(m)), None)
            out[f"{module}.{suffix}"] = _unpermute(found, groups) if arch in PERMUTED and groups else found
    return {k: v for k, v in out.items() if k in _stage_names(model, out)}


def _unpermute(rows: mx.array, heads: int) -> mx.array:
    """Undo llama.cpp's ``reshape(heads, 2, d/2, ...).swapaxes(1, 2)`` on rows: [O, B] -> [O, B]."""
    O = rows.shape[0]
    if O % (2 * heads):
        raise UnsupportedModel(f"{O} rows of q/k do not split into {heads} heads of two rotary halves")
    return rows.reshape(heads, O // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _quantize_like(model: StageModel, tensors: dict[str, mx.array], quantization: dict | None) -> None:
    """Turn the Linear/Embedding/SwitchLinear modules whose tensors come quantized (``<name>.scales``
    present) into their quantized kind, with the config's group size and bits (an MLX checkpoint) or
    those the tensors say (mlx-lm's ``infer_quant_config``: a GGUF's affine groups of 32, 4 or 8 bits;
    gpt-oss's MXFP4 experts, uint8 scales of groups of 32, as MLX's ``mxfp4`` mode)."""
    from mlx_lm.utils import infer_quant_config

    def params(path: str, module: nn.Module):
        name = model.checkpoint_name(path)
        if f"{name}.scales" not in tensors:
            return False
        if quantization is not None:
            found = quantization.get(path) or quantization.get(name)
            if isinstance(found, dict):
                return found
            return {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}
        return infer_quant_config(name, module, tensors)

    nn.quantize(model, class_predicate=params)


# --------------------------------------------------------------------------- paged KV


class PagedKV:
    """Keys and values of every layer of the stage: ``[blocks * block_size, KV, k_dim]`` and
    ``[.., KV, v_dim]`` per layer (MLA: the latent and the rope key), in the activation dtype, zeros so
    that padded reads never meet NaN."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, k_dim: int, v_dim: int,
                 dtype: mx.Dtype):
        self.k = [mx.zeros((num_blocks * block_size, kv_heads, k_dim), dtype) for _ in range(layers)]
        self.v = [mx.zeros((num_blocks * block_size, kv_heads, v_dim), dtype) for _ in range(layers)]
        self.block_size, self.dtype = block_size, dtype
        mx.eval(self.k, self.v)

    def write(self, layer: int, slots: mx.array, k: mx.array, v: mx.array) -> None:
        self.k[layer][slots] = k.astype(self.dtype)  # slots: [T]; k: [T, KV, k_dim], v: [T, KV, v_dim]
        self.v[layer][slots] = v.astype(self.dtype)

    def gather(self, layer: int, tables: mx.array, length: int) -> tuple[mx.array, mx.array]:
        """tables: [B, nb] block ids -> keys, values [B, KV, length, k_dim / v_dim] (whole blocks, cut to ``length``)."""
        B, nb = tables.shape

        def one(pool: mx.array) -> mx.array:
            blocks = pool.reshape(-1, self.block_size, *pool.shape[1:])[tables]  # [B, nb, bs, KV, dim]
            return blocks.reshape(B, nb * self.block_size, *pool.shape[1:])[:, :length].transpose(0, 2, 1, 3)

        return one(self.k[layer]), one(self.v[layer])


@dataclass(frozen=True)
class Group:
    """Rows that run as one mlx-lm batch: ``rows`` of the step's [T, D] input, shaped [B, L, D]."""

    rows: list[int]  # row indices into the step's rows, in batch order
    shape: tuple[int, int]  # (B, L)
    offset: int | mx.array  # rope position of each batch entry's first row: int (B == 1) or [B]
    slots: mx.array  # [B * L] pool slot of each row
    tables: mx.array  # [B, nb] block tables (padded with block 0)
    length: int  # keys to attend: the longest entry's pos + L
    mask: mx.array  # [B, 1, L, length] bool: key visible to the query row
    positions: np.ndarray  # [B, L] each query row's position

    def window_mask(self, window: int | None) -> mx.array:
        """``mask`` for a layer attending to the last ``window`` keys (itself included): key j visible from
        the query at p when p - window < j <= p (transformers' sliding window); ``mask`` itself for None."""
        if window is None:
            return self.mask
        recent = np.arange(self.length)[None, None, :] > self.positions[:, :, None] - window  # [B, L, length]
        return self.mask & mx.array(recent[:, None])

    @classmethod
    def decode(cls, items: list[tuple[int, StepItem]], block_size: int) -> "Group":
        """One-row items (row index, item) as a [B, 1] batch."""
        pos = [it.pos for _, it in items]
        length = max(pos) + 1
        nb = -(-length // block_size)
        tables = np.zeros((len(items), nb), np.int32)
        for b, (_, it) in enumerate(items):
            tables[b, : min(nb, len(it.blocks))] = it.blocks[:nb]
        slots = [it.blocks[p // block_size] * block_size + p % block_size for p, (_, it) in zip(pos, items)]
        visible = np.arange(length)[None, :] <= np.array(pos)[:, None]  # [B, length]
        return cls([r for r, _ in items], (len(items), 1), mx.array(pos), mx.array(slots, mx.int32), mx.array(tables),
                   length, mx.array(visible[:, None, None, :]), np.array(pos)[:, None])

    @classmethod
    def prefill(cls, row: int, item: StepItem, block_size: int) -> "Group":
        """An item of several rows at ``pos``.. as a [1, n] batch, causal after its cached rows."""
        pos, n = item.pos, item.n
        length = pos + n
        nb = -(-length // block_size)
        table = np.asarray(item.blocks[:nb], np.int32)
        p = np.arange(pos, length)
        visible = np.arange(length)[None, :] <= p[:, None]  # [n, length]
        return cls(list(range(row, row + n)), (1, n), pos, mx.array(table[p // block_size] * block_size + p % block_size),
                   mx.array(table[None]), length, mx.array(visible[None, None]), p[None])


class _PagedView:
    """What one of mlx-lm's attention layers takes as its ``cache`` for one group: the rope offset,
    and ``update_and_fetch`` writing the new keys/values into the pool and returning each batch
    entry's keys/values for its whole context."""

    def __init__(self, kv: PagedKV, layer: int, group: Group):
        self.kv, self.layer, self.group = kv, layer, group
        self.offset = group.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, KV, L, _ = keys.shape  # keys [B, KV, L, k_dim], values [B, KV, L, v_dim]
        rows = lambda t: t.transpose(0, 2, 1, 3).reshape(B * L, KV, t.shape[-1])  # noqa: E731
        self.kv.write(self.layer, self.group.slots, rows(keys), rows(values))
        k, v = self.kv.gather(self.layer, self.group.tables, self.group.length)
        return k.astype(keys.dtype), v.astype(values.dtype)


# --------------------------------------------------------------------------- the backend


class MLXBackend:
    def __init__(self, model: StageModel, spec: StageSpec):
        self.model, self.spec = model, spec
        self.dtype = DTYPES[spec.dtype]
        self.kv: PagedKV | None = None
        self.sampler = Sampler()
        self.kernels: dict[str, str] = {}  # MLX picks its own kernels
        # one KV group: every layer keeps all of a request's keys; a sliding layer masks those before its window
        self.kv_windows: tuple[int | None, ...] = (None,) * len(model.layers)

    @classmethod
    def load(cls, path: Path, model_name: str, start: int, end: int, dtype: str, device: str | None = None,
             quantize: str | None = None) -> "MLXBackend":
        device = check_device(device)
        mx.set_default_device(mx.Device(DEVICES[device]))
        config = json.loads((Path(path) / "config.json").read_text())
        model = load_stage_model(Path(path), config, start, end, DTYPES[dtype], quantize)
        spec = StageSpec(model_name, start, end, model.num_layers, model.hidden_size, model.vocab_size,
                         model.max_positions, dtype, device)
        return cls(model, spec)

    def kv_block_bytes(self, block_size: int) -> int:
        m = self.model
        return len(m.layers) * block_size * m.kv_heads * (m.k_dim + m.v_dim) * self.dtype.size

    def init_kv(self, num_blocks: int, block_size: int, group_blocks: tuple[int, ...] = ()) -> None:
        if group_blocks:
            raise ValueError("an MLX stage keeps one KV group (its layers all attend to every position)")
        m = self.model
        self.kv = PagedKV(len(m.layers), num_blocks, block_size, m.kv_heads, m.k_dim, m.v_dim, self.dtype)

    def release(self, rid: str) -> None:
        self.sampler.release(rid)

    def run(self, items: list[StepItem]) -> StepOutput:
        x = self._inputs(items)  # [T, D]
        starts = np.cumsum([0] + [i.n for i in items])
        groups = self._groups(items, starts)
        outs = [self._forward(x[mx.array(g.rows)].reshape(*g.shape, -1), g) for g in groups]  # [B, L, D] each
        done = mx.concatenate([o.reshape(-1, o.shape[-1]) for o in outs])  # [T, D] in group order
        where = np.argsort(np.concatenate([g.rows for g in groups]))  # step row -> row of ``done``
        if not self.spec.last:
            hidden = done[mx.array(where)]  # [T, D] in item order
            mx.eval(hidden, self.kv.k, self.kv.v)
            return StepOutput(_to_bytes(hidden), hidden.shape[1] * hidden.itemsize, ())
        # each item's last ``outputs`` rows (the scored prompt rows, the one it samples after), in item order
        out_rows = [int(where[r]) for k, i in enumerate(items) for r in range(int(starts[k + 1]) - i.outputs, int(starts[k + 1]))]
        if not out_rows:
            mx.eval(self.kv.k, self.kv.v)
            return StepOutput(None, 0, ())
        logits = self.model.head(done[mx.array(out_rows)])  # [R, V]
        mx.eval(logits, self.kv.k, self.kv.v)
        return sample_step(self.sampler, _to_torch(logits), items)

    def _groups(self, items: list[StepItem], starts: np.ndarray) -> list[Group]:
        bs = self.kv.block_size
        single = [(int(starts[k]), it) for k, it in enumerate(items) if it.n == 1]
        groups = [Group.decode(single, bs)] if single else []
        return groups + [Group.prefill(int(starts[k]), it, bs) for k, it in enumerate(items) if it.n > 1]

    def _forward(self, h: mx.array, group: Group) -> mx.array:
        masks = {w: group.window_mask(w) for w in set(self.model.windows)}
        for j, layer in enumerate(self.model.layers):  # h: [B, L, D]
            h = layer(h, masks[self.model.windows[j]], cache=_PagedView(self.kv, j, group)).astype(self.dtype)
        return h

    def _inputs(self, items: list[StepItem]) -> mx.array:
        raw = b"".join(bytes(i.data) for i in items)
        if self.spec.first:
            ids = mx.array(np.frombuffer(raw, np.int32))  # [T]
            return self.model.embed_tokens(ids).astype(self.dtype)  # [T, D]
        return _from_bytes(raw, items[0].dtype).reshape(-1, self.spec.hidden_size).astype(self.dtype)


def check_device(device: str | None) -> str:
    """--device for MLX: cpu or gpu (Metal; the default where it exists)."""
    device = device or default_device()
    if device not in DEVICES:
        raise UsageError(f"--device {device!r}: the MLX backend runs on cpu or gpu")
    if device == "gpu" and not mx.metal.is_available():
        raise UsageError("--device gpu: MLX has no GPU on this machine (Metal is macOS only); use --device cpu")
    return device


def _from_bytes(raw: bytes, dtype: str) -> mx.array:
    """Raw rows of a wire dtype -> a flat MLX array (bf16 travels as its bits)."""
    if dtype == "bfloat16":
        return mx.array(np.frombuffer(raw, np.uint16)).view(mx.bfloat16)
    return mx.array(np.frombuffer(raw, {"float32": np.float32, "float16": np.float16}[dtype]))


def _to_bytes(t: mx.array) -> memoryview:
    bits = t.view(mx.uint16) if t.dtype == mx.bfloat16 else t
    return memoryview(np.ascontiguousarray(np.array(bits, copy=False))).cast("B")


def _to_torch(t: mx.array) -> torch.Tensor:
    """Logits [S, V] as a torch tensor of the same dtype (for :mod:`.sampling`)."""
    if t.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(t.view(mx.uint16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(t))


def estimate_layer_ms(layer_bytes: int, hidden_size: int, dtype: str, budget_s: float = 0.05) -> float:
    """Decode time of one layer at batch 1 on MLX, estimated like the torch backend's
    (``profile.estimate_layer_ms``): a matrix-vector product over a layer's weight bytes, median of
    the runs that fit in ``budget_s`` (at least 5)."""
    dt = DTYPES[dtype]
    w = mx.random.normal((max(1, layer_bytes // (hidden_size * dt.size)), hidden_size)).astype(dt)  # [R, D]
    x = mx.random.normal((1, hidden_size)).astype(dt)  # [1, D]
    mx.eval(w, x, x @ w.T)
    times: list[float] = []
    end = time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < end and len(times) < 10_000):
        started = time.perf_counter()
        mx.eval(x @ w.T)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)
