"""Qwen3 (dense): the Llama decoder with RMSNorm on each query and key head (sliding windows as Qwen2 has them)."""

from dataclasses import dataclass

from .llama import QwenWindows
from .llama import StageModel  # noqa: F401  (the architecture's stage model)


@dataclass(frozen=True)
class ModelArgs(QwenWindows):
    qk_norm: bool = True
