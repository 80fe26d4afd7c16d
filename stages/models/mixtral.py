"""Mixtral: the Llama decoder with routed experts in every layer (``block_sparse_moe``: router ``gate``,
experts ``w1`` (gate), ``w3`` (up), ``w2`` (down)), the top-k probabilities always renormalised.

With a ``sliding_window`` every layer slides (``llama.Attention`` masks the keys before the window; the KV
cache still keeps every position)."""

from __future__ import annotations

from dataclasses import dataclass

from .moe import MoEArgs, MoEStageModel

_HF_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


@dataclass(frozen=True)
class ModelArgs(MoEArgs):
    norm_topk_prob: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "norm_topk_prob", True)  # Mixtral renormalises whatever the config says


class StageModel(MoEStageModel):
    def hf_name(self, name: str) -> str:
        """``layers.i.mlp.experts.e.gate_proj.weight`` -> ``model.layers.{start+i}.block_sparse_moe.experts.e.w1.weight``."""
        hf = super().hf_name(name)
        if ".mlp." not in hf:
            return hf
        hf = hf.replace(".mlp.", ".block_sparse_moe.", 1)
        for ours, theirs in _HF_EXPERT.items():
            hf = hf.replace(f".{ours}.", f".{theirs}.")
        return hf
