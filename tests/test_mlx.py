"""The MLX stage backend (``mlx[cpu]`` on Linux): exact against transformers and the torch backend,
alone, split, batched, chunked, and mixed with torch stages in one pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")

from parallax.broker.layers import even_split  # noqa: E402
from parallax.broker.wire import SamplingParams  # noqa: E402
from parallax.stages.backend import SampleSpec, StepItem  # noqa: E402
from parallax.stages.mlx_backend import MLXBackend  # noqa: E402
from parallax.stages.sampling import greedy  # noqa: E402
from parallax.stages.torch_backend import TorchBackend  # noqa: E402
from tests.cluster import ids, make_tiny_model, reference_greedy  # noqa: E402

LAYERS = 5  # odd: a 2-stage split is uneven
GREEDY = SampleSpec(SamplingParams(temperature=0.0), (), 0)
BLOCK = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random models per model_type (float32, 5 layers, vocab 512)."""
    made = {}

    def get(model_type: str = "llama"):
        if model_type not in made:
            made[model_type] = make_tiny_model(tmp_path_factory.mktemp(model_type) / "m", model_type, layers=LAYERS)
        return made[model_type]

    return get


class Logits:
    """A stand-in sampler that keeps the logits it is given and answers greedily."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def sample(self, logits, rids, specs):
        self.seen.append(logits.float().clone())
        return greedy(logits)

    def release(self, rid):
        pass


def load(backend, path, start, end, dtype="float32", blocks=64):
    b = backend.load(path, "tiny", start, end, dtype, "cpu")
    b.init_kv(blocks, BLOCK)
    return b


def item(rid, pos, data, n, table, sample=True, dtype="int32", prompt=True):
    return StepItem(rid, pos, n, data, dtype, GREEDY if sample else None, tuple(table), prompt)


def transformers_logits(path, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0]  # [L, V]


PROMPT = [5, 77, 300, 12, 9, 401, 250, 3, 18, 64, 111]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_float32_logits_equal_transformers(tiny, model_type):
    path = tiny(model_type)
    b = load(MLXBackend, path, 0, LAYERS)
    b.sampler = Logits()
    tokens = list(PROMPT)
    out = b.run([item("a", 0, ids(tokens), len(tokens), range(4))])
    for _ in range(3):  # decode rows read the paged KV of the prompt
        tokens.append(out.tokens[0])
        out = b.run([item("a", len(tokens) - 1, ids(tokens[-1:]), 1, range(4), prompt=False)])
    expected = transformers_logits(path, tokens)
    for k, got in enumerate(b.sampler.seen):
        torch.testing.assert_close(got[0], expected[len(PROMPT) - 1 + k], atol=5e-4, rtol=1e-4)


def run_split(backends, prompt, new_tokens):
    """Greedy decoding through stages in order (hidden rows handed on as the wire does: raw bytes)."""
    tokens, pos, out = list(prompt), 0, []
    table = range(8)
    while len(out) < new_tokens:
        data, dtype, n = ids(tokens[pos:]), "int32", len(tokens) - pos
        for b in backends:
            result = b.run([item("r", pos, data, n, table, sample=b.spec.last, dtype=dtype, prompt=pos == 0)])
            data, dtype = result.hidden, b.spec.dtype
        out.append(result.tokens[0])
        pos, tokens = len(tokens), tokens + [result.tokens[0]]
    return out


@pytest.mark.parametrize("stages", [2, 3])
def test_every_layer_is_served_once_in_order(tiny, stages):
    """An uneven split of 5 layers: stage layers j hold checkpoint layer start + j, together every
    layer exactly once, and the chain decodes like transformers."""
    from safetensors.numpy import load_file

    path = tiny()
    ranges = even_split(LAYERS, stages)
    backends = [load(MLXBackend, path, a, b) for a, b in ranges]
    checkpoint = load_file(str(path / "model.safetensors"))
    served = []
    for b in backends:
        for j, layer in enumerate(b.model.layers):
            i = b.spec.start + j
            for name in ("mlp.down_proj.weight", "self_attn.q_proj.weight", "input_layernorm.weight"):
                module = layer
                for part in name.split(".")[:-1]:
                    module = getattr(module, part)
                np.testing.assert_array_equal(np.array(module.weight), checkpoint[f"model.layers.{i}.{name}"])
            served.append(i)
    assert served == list(range(LAYERS))
    assert run_split(backends, PROMPT, 8) == reference_greedy(path, PROMPT, 8)


def test_two_stage_split_greedy_equals_transformers_for_qwen3(tiny):
    path = tiny("qwen3")
    backends = [load(MLXBackend, path, 0, 2), load(MLXBackend, path, 2, LAYERS)]
    assert run_split(backends, PROMPT, 8) == reference_greedy(path, PROMPT, 8)


def hidden_rows(result, width):
    return np.frombuffer(result.hidden, np.float32).reshape(-1, width)


def test_batched_rows_equal_unbatched(tiny):
    """Prompts and decode rows of three requests in one step give the bytes each gives alone."""
    path = tiny()
    prompts = {"a": PROMPT[:7], "b": PROMPT + [1], "c": [42]}
    tables = {rid: range(4 * k, 4 * k + 4) for k, rid in enumerate(prompts)}
    alone_b, together_b = load(MLXBackend, path, 0, 2), load(MLXBackend, path, 0, 2)
    width = alone_b.spec.hidden_size
    alone = {rid: [hidden_rows(alone_b.run([item(rid, 0, ids(p), len(p), tables[rid], False)]), width)]
             for rid, p in prompts.items()}
    together = [item(rid, 0, ids(p), len(p), tables[rid], False) for rid, p in prompts.items()]
    rows = hidden_rows(together_b.run(together), width)
    split = np.cumsum([0] + [len(p) for p in prompts.values()])
    for k, rid in enumerate(prompts):
        np.testing.assert_array_equal(rows[split[k] : split[k + 1]], alone[rid][0])
    for step in range(2):  # decode: one row per request, at different positions
        decode = [item(rid, len(p) + step, ids([7 + step]), 1, tables[rid], False, prompt=False)
                  for rid, p in prompts.items()]
        rows = hidden_rows(together_b.run(decode), width)
        for k, d in enumerate(decode):
            np.testing.assert_array_equal(rows[k : k + 1], hidden_rows(alone_b.run([d]), width))


def test_chunked_prefill_equals_whole(tiny):
    path = tiny()
    prompt = PROMPT + [13, 14]
    whole, chunked = load(MLXBackend, path, 0, 3), load(MLXBackend, path, 0, 3)
    width = whole.spec.hidden_size
    expected = hidden_rows(whole.run([item("w", 0, ids(prompt), len(prompt), range(4), False)]), width)
    got, pos = [], 0
    for n in (5, 5, 3):
        got.append(hidden_rows(chunked.run([item("c", pos, ids(prompt[pos : pos + n]), n, range(4), False)]), width))
        pos += n
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-5, rtol=1e-5)
    step = [item("x", len(prompt), ids([3]), 1, range(4), False, prompt=False)]
    np.testing.assert_allclose(hidden_rows(chunked.run(step), width), hidden_rows(whole.run(step), width),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("first,second", [(TorchBackend, MLXBackend), (MLXBackend, TorchBackend)],
                         ids=["torch-mlx", "mlx-torch"])
def test_bf16_rows_cross_between_backends(tiny, first, second):
    """bf16 activations leave one backend as raw bytes the other reads: both backends' bf16 rows are
    within bf16 rounding of the float32 rows, and the mixed chain decodes like the torch chain."""
    path = tiny()
    data = [item("r", 0, ids(PROMPT), len(PROMPT), range(8), False)]
    as_float = lambda r, dtype: torch.frombuffer(bytearray(r.hidden), dtype=dtype).float()  # noqa: E731
    exact = as_float(load(TorchBackend, path, 0, 2).run(data), torch.float32)
    for backend in (first, second):
        rows = load(backend, path, 0, 2, "bfloat16").run(data)
        assert rows.row_bytes == 2 * exact.numel() // len(PROMPT)
        assert (as_float(rows, torch.bfloat16) - exact).norm() / exact.norm() < 0.05  # measured: 0.024 (torch), 0.026 (mlx)
    mixed = [load(first, path, 0, 2, "bfloat16"), load(second, path, 2, LAYERS, "bfloat16")]
    torch_only = [load(TorchBackend, path, 0, 2, "bfloat16"), load(TorchBackend, path, 2, LAYERS, "bfloat16")]
    assert run_split(mixed, PROMPT, 6) == run_split(torch_only, PROMPT, 6)
