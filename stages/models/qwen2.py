"""Qwen2 / Qwen2.5: the Llama decoder with a bias on the q/k/v projections."""

from dataclasses import dataclass

from .llama import ModelArgs as LlamaArgs
from .llama import StageModel  # noqa: F401  (the architecture's stage model)


@dataclass(frozen=True)
class ModelArgs(LlamaArgs):
    qkv_bias: bool = True
