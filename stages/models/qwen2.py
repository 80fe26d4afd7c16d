"""Qwen2 / Qwen2.5: the Llama decoder with a bias on the q/k/v projections (sliding windows as Qwen2 has them)."""

from dataclasses import dataclass

from .llama import QwenWindows
from .llama import StageModel  # noqa: F401  (the architecture's stage model)


@dataclass(frozen=True)
class ModelArgs(QwenWindows):
    qkv_bias: bool = True
