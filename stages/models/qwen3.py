"""Qwen3 (dense): the Llama decoder with RMSNorm on each query and key head."""

from dataclasses import dataclass

from .llama import ModelArgs as LlamaArgs
from .llama import StageModel  # noqa: F401  (the architecture's stage model)


@dataclass(frozen=True)
class ModelArgs(LlamaArgs):
    qk_norm: bool = True
