"""Stages on a CUDA device (the torch backend with weights, the paged KV pool and attention on the GPU),
alone and beside a CPU stage. Skipped where torch sees no GPU; run them on a GPU machine with
``python -m pytest tests/test_cuda.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parallax.broker.wire import SamplingParams
from parallax.stages.backend import SampleSpec, StepItem
from parallax.stages.torch_backend import TorchBackend
from tests.cluster import ids, make_tiny_model, reference_greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False")
LAYERS, NEW_TOKENS, BLOCK = 6, 12, 8
PROMPTS = [[5, 17, 3, 99, 42, 7], [1, 2, 3], list(range(40, 83))]


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 on the GPU as float32 (TF32 matmuls would round inputs to 10 mantissa bits)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / request.param, request.param, layers=LAYERS)


def chain(path, cuts: list[tuple[int, int, str]], dtype: str = "float32") -> list[TorchBackend]:
    stages = [TorchBackend.load(path, "tiny", a, b, dtype, device) for a, b, device in cuts]
    for s in stages:
        s.init_kv(64, BLOCK)
    return stages


def generate(stages: list[TorchBackend], prompt: list[int], new_tokens: int, rid: str = "r") -> list[int]:
    """Greedy tokens through the stages in order (hidden rows handed on as the wire's bytes)."""
    table = tuple(range(-(-(len(prompt) + new_tokens) // BLOCK)))
    greedy = SampleSpec(SamplingParams(temperature=0.0, max_tokens=new_tokens), (), 0)
    tokens: list[int] = []
    while len(tokens) < new_tokens:
        pos, rows = (0, prompt) if not tokens else (len(prompt) + len(tokens) - 1, tokens[-1:])
        data, dtype = ids(rows), "int32"
        for s in stages:
            item = StepItem(rid, pos, len(rows), data, dtype, greedy if s.spec.last else None, table, prompt=not tokens)
            out = s.run([item])
            data, dtype = out.hidden, s.spec.dtype
        tokens += out.tokens
    return tokens


def test_a_cuda_stage_holds_its_weights_and_kv_on_the_gpu(tiny):
    (stage,) = chain(tiny, [(0, LAYERS, "cuda")])
    assert {p.device.type for p in stage.model.parameters()} == {"cuda"}
    assert stage.kv.k.device.type == "cuda" and stage.kv.v.device.type == "cuda"
    assert stage.spec.device.startswith("cuda")


def test_float32_on_cuda_equals_transformers(tiny):
    stages = chain(tiny, [(0, LAYERS, "cuda")])
    for k, prompt in enumerate(PROMPTS):
        assert generate(stages, prompt, NEW_TOKENS, f"r{k}") == reference_greedy(tiny, prompt, NEW_TOKENS)


@pytest.mark.parametrize("devices", [("cpu", "cuda"), ("cuda", "cpu"), ("cuda", "cuda")])
def test_a_split_across_cpu_and_gpu_equals_transformers(tiny, devices):
    stages = chain(tiny, [(0, 2, devices[0]), (2, LAYERS, devices[1])])
    for k, prompt in enumerate(PROMPTS):
        assert generate(stages, prompt, NEW_TOKENS, f"r{k}") == reference_greedy(tiny, prompt, NEW_TOKENS)


def test_bf16_batched_decode_on_cuda_serves_every_request(tiny):
    """bf16 on the GPU: many requests decode in one step, each its own KV; tokens match each alone as long
    as cuBLAS picks the same algorithm for both batch sizes (not guaranteed: compared loosely)."""
    (stage,) = chain(tiny, [(0, LAYERS, "cuda")], "bfloat16")
    greedy = SampleSpec(SamplingParams(temperature=0.0, max_tokens=4), (), 0)
    tables = {k: tuple(range(8 * k, 8 * k + 8)) for k in range(len(PROMPTS))}
    first = [stage.run([StepItem(f"b{k}", 0, len(p), ids(p), "int32", greedy, tables[k], prompt=True)]).tokens[0]
             for k, p in enumerate(PROMPTS)]
    step = [StepItem(f"b{k}", len(p), 1, ids([first[k]]), "int32", greedy, tables[k], prompt=False)
            for k, p in enumerate(PROMPTS)]
    together = stage.run(step).tokens
    alone = [stage.run([item]).tokens[0] for item in step]
    assert len(together) == len(PROMPTS) and all(0 <= t < 512 for t in together)
    assert np.mean(np.array(together) == np.array(alone)) >= 2 / 3
