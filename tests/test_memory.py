"""A loaded stage's resident memory agrees with what its registry profile says it holds (issue 9).

A synthetic Llama big enough for its weights to stand out of the process's own footprint (~230 M
parameters: bf16 safetensors, Q8_0 and Q4_0 GGUF, and the bf16 folder quantized at load) is loaded by a
fresh process per stage range. That process imports what a load imports and compiles the kernels first, then
measures its RSS before and after ``TorchBackend.load`` (tuning included); the growth must be within 15%
of the bytes the profile gives that range (layers + embedding on the first stage, norm + lm_head on the
last). A stage that kept a float32, dequantized or transposed copy of its weights grows by 2x or more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.synth import SynthConfig, synthesize

ROOT = Path(__file__).resolve().parent.parent
CONFIG = SynthConfig(hidden=1024, intermediate=4096, layers=12, heads=16, kv_heads=4, context=512)

MEASURE = r"""
import gc, json, sys
import psutil, torch, transformers
from parallax.stages import kernels
from parallax.stages.profile import model_profile
from parallax.stages.torch_backend import TorchBackend, release_free_memory
from parallax.broker.model import resolve_model

model, start, end, quantize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] or None
torch.set_num_threads(1)
kernels.warm_up()
import parallax.stages.models.llama, transformers.modeling_rope_utils
source = resolve_model(model)
transformers.AutoConfig.from_pretrained(source.path)  # what any load imports and builds: not weights
release_free_memory()  # what the load does at its end: both sides of the difference alike
before = psutil.Process().memory_info().rss
backend = TorchBackend.load(source.path, source.name, start, end, "bfloat16", "cpu", quantize)
for m in backend.model.modules():  # memory-mapped weights (an embedding table) are resident once used
    w = getattr(m, "weight", None)
    w = w.weight if isinstance(w, kernels.Matrix) else w  # a dense projection's tensor
    if isinstance(w, torch.Tensor):
        w.sum()
gc.collect()
grown = psutil.Process().memory_info().rss - before
p = model_profile(source.path, "bfloat16", quantize)
held = (end - start) * p.layer_bytes + (p.first_bytes if start == 0 else 0) + (p.last_bytes if end == p.num_layers else 0)
print(json.dumps({"grown": grown, "profile": held}))
"""


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth-mid")
    synthesize(CONFIG, out, ("q8_0", "q4_0"), shard_mb=128)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One PARALLAX_CACHE for the module: GGUF folders and kernel picks made once."""
    return tmp_path_factory.mktemp("parallax-cache")


def measure(model: Path, start: int, end: int, quantize: str | None, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PARALLAX_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(model), str(start), str(end), quantize or ""],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
# a subprocess per case (suite time): bf16 and GGUF blocks as the first stage (embedding), quantized at load as the
# last (norm + lm_head); Q8_0 GGUF blocks' held bytes are checked in process (test_gguf_weights, test_quant_model)
@pytest.mark.parametrize("kind, layers", [("bf16", (0, 6)), ("q4_0.gguf", (0, 6)), ("bf16 --quantize q4_0", (6, 12))],
                         ids=["first-bf16", "first-q4_0.gguf", "last-bf16 --quantize q4_0"])
def test_resident_memory_of_a_loaded_stage_matches_its_profile(synth, cache, kind, layers):
    model = synth / "hf" if kind.startswith("bf16") else synth / f"synth-{kind}"
    quantize = kind.split()[-1] if "--quantize" in kind else None
    m = measure(model, *layers, quantize, cache)
    assert m["profile"] > 50e6  # the weights dominate: the check below could not pass by noise
    assert abs(m["grown"] - m["profile"]) <= 0.15 * m["profile"], (
        f"{kind} layers {layers}: RSS grew {m['grown'] / 1e6:.1f} MB, the profile says {m['profile'] / 1e6:.1f} MB")
