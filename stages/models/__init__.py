"""One module per architecture, picked by ``model_type`` (each has ``ModelArgs`` and ``StageModel``)."""

from __future__ import annotations

import importlib
from types import ModuleType

from parallax.broker.errors import UnsupportedModel, UsageError

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe",
                 "mixtral": "mixtral", "deepseek_v3": "deepseek_v3"}
QUANTIZE_TYPES = ("q8_0", "q4_0")  # --quantize: what a dense checkpoint's matrices can become at load


def already_quantized(gguf_name: str) -> UsageError:
    """--quantize given for a GGUF source (it serves its own blocks)."""
    return UsageError(f"{gguf_name} is already quantized; drop --quantize to serve its own blocks, "
                      "or add --dequantize to quantize a dense copy of it")


def sliding_window_unsupported() -> UnsupportedModel:
    return UnsupportedModel("sliding-window attention layers are not supported yet")


def architecture(config: dict) -> ModuleType:
    model_type = config.get("model_type", "?")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModel(f"model_type {model_type!r} is not supported (have: {', '.join(ARCHITECTURES)})")
    if any(t != "full_attention" for t in config.get("layer_types") or []) or config.get("use_sliding_window"):
        raise sliding_window_unsupported()
    return importlib.import_module(f"{__name__}.{ARCHITECTURES[model_type]}")
