"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (RMSNorm on each query and key head),
routed experts in the layers ``decoder_sparse_step`` and ``mlp_only_layers`` make sparse (``moe``). With
``use_sliding_window`` every layer slides (transformers' Qwen3-MoE has no ``layer_types``)."""

from dataclasses import dataclass

from .moe import MoEArgs
from .moe import MoEStageModel as StageModel  # noqa: F401  (the architecture's stage model)


@dataclass(frozen=True)
class ModelArgs(MoEArgs):
    qk_norm: bool = True
    norm_topk_prob: bool = False  # transformers' Qwen3MoeConfig default (the released models set it true)
    use_sliding_window: bool = False
