"""One module per architecture, picked by ``model_type`` (each has ``ModelArgs`` and ``StageModel``)."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType

from parallax.broker.errors import UnsupportedModel, UsageError

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe",
                 "mixtral": "mixtral", "deepseek_v3": "deepseek_v3", "gpt_oss": "gpt_oss"}
QUANTIZE_TYPES = ("q8_0", "q4_0")  # --quantize: what a dense checkpoint's matrices can become at load
SLIDING, FULL = "sliding_attention", "full_attention"  # the attention kinds of ``layer_types`` served


def already_quantized(gguf_name: str) -> UsageError:
    """--quantize given for a GGUF source (it serves its own blocks)."""
    return UsageError(f"{gguf_name} is already quantized; drop --quantize to serve its own blocks, "
                      "or add --dequantize to quantize a dense copy of it")


def check_layer_types(types: Iterable[str]) -> None:
    """Refuses attention kinds other than full and sliding-window ones (e.g. chunked or linear attention)."""
    other = sorted({str(t) for t in types} - {SLIDING, FULL})
    if other:
        raise UnsupportedModel(f"attention layers of type {', '.join(other)} are not supported (have: {FULL}, {SLIDING})")


def architecture(config: dict) -> ModuleType:
    model_type = config.get("model_type", "?")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModel(f"model_type {model_type!r} is not supported (have: {', '.join(ARCHITECTURES)})")
    check_layer_types(config.get("layer_types") or [])
    return importlib.import_module(f"{__name__}.{ARCHITECTURES[model_type]}")
