"""PyTorch backend: loads only its layers from safetensors and runs them on CPU or CUDA."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from . import kernels
from .backend import StageSpec, StepItem, StepOutput
from .kv import KVPool, Rows
from .models import UnsupportedModel, architecture
from .sampling import Sampler

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int32": torch.int32}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class TorchBackend:
    def __init__(self, model: torch.nn.Module, spec: StageSpec):
        self.model, self.spec = model, spec
        self.device, self.dtype = torch.device(spec.device), DTYPES[spec.dtype]
        args = model.args
        self._kv_shape = (len(model.layers), args.kv_heads, args.dim_head)
        self.kv: KVPool | None = None
        self.sampler = Sampler()
        self.kernels: dict[str, str] = {}  # set by the kernel tuning at load

    @classmethod
    def load(cls, path: Path, model_name: str, start: int, end: int, dtype: str, device: str | None = None) -> "TorchBackend":
        config = json.loads((Path(path) / "config.json").read_text())
        model = load_stage_model(Path(path), config, start, end, DTYPES[dtype], torch.device(device or default_device()))
        args = model.args
        spec = StageSpec(
            model_name, start, end, args.num_hidden_layers, args.hidden_size, args.vocab_size,
            args.max_position_embeddings, dtype, device or default_device(),
        )
        return cls(model, spec)

    def kv_block_bytes(self, block_size: int) -> int:
        return KVPool.bytes_per_block(*self._kv_shape, block_size, self.dtype)

    def init_kv(self, num_blocks: int, block_size: int) -> None:
        self.kv = KVPool(*self._kv_shape, num_blocks, block_size, self.dtype, self.device)

    def run(self, items: list[StepItem]) -> StepOutput:
        groups = self._groups(items)
        outs = [self._forward([items[i] for i in g]) for g in groups]
        out = outs[0] if len(groups) == 1 else _in_item_order(items, groups, outs, self.spec.last)
        if not self.spec.last:
            return StepOutput(_to_bytes(out), out.shape[1] * out.element_size(), ())
        sampled = [i for i in items if i.sample is not None]
        tokens = self.sampler.sample(out, [i.rid for i in sampled], [i.sample for i in sampled])
        return StepOutput(None, 0, tuple(tokens))

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
        parts = [(i.blocks, i.pos, i.n, i.sample is not None) for i in items]
        rows = Rows.build(parts, self.kv.block_size, self.device, prompt=all(i.prompt for i in items))
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
    """Rows of several forwards back in item order: each item's n hidden rows, or its one logits row
    when it samples (last stage)."""
    pieces: dict[int, torch.Tensor] = {}
    for group, out in zip(groups, outs):
        sizes = [(1 if items[i].sample is not None else 0) if last else items[i].n for i in group]
        pieces.update(zip(group, out.split(sizes)))
    return torch.cat([pieces[i] for i in range(len(items))])


def _to_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().cpu().view(torch.uint8).numpy()).cast("B")


def load_stage_model(path: Path, config: dict, start: int, end: int, dtype: torch.dtype, device: torch.device):
    """Build layers start:end on the meta device and load only their tensors (mmap'd safetensors)."""
    arch = architecture(config)
    args = arch.ModelArgs.from_dict(config)
    if not 0 <= start < end <= args.num_hidden_layers:
        raise ValueError(f"layers {start}:{end} are outside 0:{args.num_hidden_layers} of this model")
    with torch.device("meta"):
        model = arch.StageModel(args, start, end)
    state = _read_tensors(path, model, args.tie_word_embeddings, dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq, model.attention_scaling = _rope(path, args.dim_head, device)
    model.fuse()
    if device.type == "cpu" and dtype == torch.bfloat16:
        kernels.warm_up()
    model.kernel_picks = kernels.tune(kernels.projections(model), dtype) if device.type == "cpu" else {}
    log.info("loaded layers %d:%d of %s (%d tensors, %.1f M params)", start, end, path, len(state),
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model.eval()


def _read_tensors(path: Path, model, tied: bool, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    files = checkpoint_index(path)
    wanted = {name: model.hf_name(name) for name in model.state_dict()}
    if tied and "lm_head.weight" in wanted and "lm_head.weight" not in files:
        wanted["lm_head.weight"] = "model.embed_tokens.weight"
    missing = sorted(src for src in wanted.values() if src not in files)
    if missing:
        raise UnsupportedModel(f"checkpoint {path} lacks tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    by_file: dict[str, list[str]] = {}
    for name, src in wanted.items():
        by_file.setdefault(files[src], []).append(name)
    state = {}
    for file, names in by_file.items():
        with safe_open(path / file, framework="pt", device="cpu") as f:
            for name in names:
                state[name] = f.get_tensor(wanted[name]).to(device=device, dtype=dtype)
    return state


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
