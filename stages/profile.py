"""What a stage tells the scheduler about the model and itself before it serves anything:
sizes read from the checkpoint's headers (no weights loaded) and a quick speed probe."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch
from safetensors import safe_open

from parallax.broker.registry import ModelProfile

from .models import architecture
from parallax.broker.model import read_config
from .torch_backend import DTYPES, checkpoint_index


def model_profile(path: Path, dtype: str) -> ModelProfile:
    """Bytes of one decoder layer, of the embeddings and of norm + lm_head, in the serving dtype."""
    config = read_config(path)
    args = architecture(config).ModelArgs.from_dict(config)
    numel = _numels(path)
    size = torch.empty((), dtype=DTYPES[dtype]).element_size()
    layer = sum(n for name, n in numel.items() if name.startswith("model.layers.0."))
    embed = numel.get("model.embed_tokens.weight", 0)
    head = numel.get("lm_head.weight", embed) + numel.get("model.norm.weight", 0)
    return ModelProfile(num_layers=args.num_hidden_layers, layer_bytes=layer * size, first_bytes=embed * size,
                        last_bytes=head * size, kv_bytes_per_token=2 * args.kv_heads * args.dim_head * size)


def _numels(path: Path) -> dict[str, int]:
    by_file: dict[str, list[str]] = {}
    for name, file in checkpoint_index(path).items():
        by_file.setdefault(file, []).append(name)
    numel: dict[str, int] = {}
    for file, names in by_file.items():
        with safe_open(Path(path) / file, framework="pt") as f:
            for name in names:
                numel[name] = math.prod(f.get_slice(name).get_shape())
    return numel


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
