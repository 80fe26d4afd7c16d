"""The MLX stage backend (``mlx[cpu]`` on Linux): exact against transformers and the torch backend,
alone, split, batched, chunked, and mixed with torch stages in one pipeline."""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")

from parallax.broker.layers import even_split  # noqa: E402
from parallax.broker.server import free_port  # noqa: E402
from parallax.broker.wire import SamplingParams  # noqa: E402
from parallax.stages.backend import SampleSpec, StepItem  # noqa: E402
from parallax.stages.mlx_backend import MLXBackend  # noqa: E402
from parallax.stages.sampling import greedy  # noqa: E402
from parallax.stages.torch_backend import TorchBackend  # noqa: E402
from tests.cluster import ids, make_tiny_model, reference_greedy  # noqa: E402
from tests.test_e2e import wait_health  # noqa: E402

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
    table = range(32)  # block ids of the one request (pools of 64 blocks)
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


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_gguf_blocks_serve_like_the_torch_backend(tiny, tmp_path, qtype):
    """A llama.cpp-style GGUF (q/k rows permuted, every matrix quantized): MLX keeps the blocks
    quantized and its float32 logits equal the torch backend's on the same file; in bf16 the blocks'
    f16 scales stay f16 (bf16 scales would lose 3 bits)."""
    from tests.test_quant_model import QTYPES, write_gguf

    folder = write_gguf(tiny(), tmp_path, QTYPES[qtype])
    chains, tokens = {}, {}
    for backend in (TorchBackend, MLXBackend):
        chains[backend] = [load(backend, folder, 0, 2), load(backend, folder, 2, LAYERS)]
        chains[backend][-1].sampler = Logits()
        tokens[backend] = run_split(chains[backend], PROMPT, 4)
    assert tokens[MLXBackend] == tokens[TorchBackend]
    seen = [chains[b][-1].sampler.seen for b in (MLXBackend, TorchBackend)]
    assert len(seen[0]) == len(seen[1]) == 4
    for got, want in zip(*seen):
        torch.testing.assert_close(got, want, atol=5e-4, rtol=1e-4)
    q_proj = load(MLXBackend, folder, 0, 1, "bfloat16").model.layers[0].self_attn.q_proj
    assert q_proj.bits == {"q8_0": 8, "q4_0": 4}[qtype] and q_proj.scales.dtype == mx.float16


def test_mlx_quantized_checkpoint_equals_mlx_lm(tiny, tmp_path):
    """An mlx-community style checkpoint (4-bit groups of 32, ``quantization`` in config.json) loads
    quantized, and a stage serving it gives mlx-lm's own model's logits."""
    import json

    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    source = tiny()
    dense = load(MLXBackend, source, 0, LAYERS).model
    nn.quantize(dense, group_size=32, bits=4)
    mx.save_safetensors(str(tmp_path / "model.safetensors"),
                        {dense.checkpoint_name(k): v for k, v in tree_flatten(dense.parameters())})
    config = json.loads((source / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 32, "bits": 4}}))
    reference, _ = load_model(tmp_path)
    stage = load(MLXBackend, tmp_path, 0, LAYERS)
    stage.sampler = Logits()
    stage.run([item("a", 0, ids(PROMPT), len(PROMPT), range(4))])
    assert isinstance(stage.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    expected = np.array(reference(mx.array([PROMPT]))[0, -1])
    np.testing.assert_allclose(stage.sampler.seen[0][0].numpy(), expected, atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------- real processes + the gateway


class Stack:
    """nats-server, a gateway and stage processes (each with its backend), stopped by PID."""

    def __init__(self, server, group, model: str, logs):
        self.server, self.group, self.model, self.logs = server, group, model, logs
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.stages: dict[tuple[int, int], object] = {}

    def spawn(self, name: str, module: str, *args: str):
        out = open(self.logs / f"{name}.log", "w")
        return self.group.spawn(name, [sys.executable, "-m", module, "--model", self.model, "--nats", self.server.url,
                                       *args], stdout=out, stderr=out)

    def start_gateway(self) -> None:
        self.spawn("gateway", "parallax.gateway.cli", "--port", str(self.port))
        wait_health(self.base, self.group, want=503)

    def stage(self, backend: str, start: int, end: int) -> None:
        """Serve start:end on ``backend`` instead of whatever served it."""
        old = self.stages.pop((start, end), None)
        if old is not None:
            old.proc.terminate()
            old.proc.wait(30)
            self.group.children.remove(old)
            wait_health(self.base, self.group, want=503)
        self.stages[(start, end)] = self.spawn(
            f"{backend}-{start}-{end}", "parallax.stages.cli", "--layers", f"{start}:{end}", "--backend", backend,
            "--dtype", "float32", "--kv-cache-memory", "0.05", "--node-id", f"{backend}-{start}-{end}")

    def ready(self) -> None:
        """Healthy, and every mlx stage says it loaded on MLX (a torch stage never does)."""
        wait_health(self.base, self.group)
        for (start, end), child in self.stages.items():
            on_mlx = "on MLX" in (self.logs / f"{child.name}.log").read_text()
            assert on_mlx == child.name.startswith("mlx"), child.name

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="none", max_retries=0, timeout=300)


@contextlib.contextmanager
def stack(model: str, logs):
    from parallax.broker.server import EmbeddedServer, ServerConfig
    from parallax.procs import ProcessGroup, pid_alive

    with EmbeddedServer(ServerConfig(port=free_port())) as server, ProcessGroup() as group:
        s = Stack(server, group, model, logs)
        s.start_gateway()
        yield s
    assert not any(pid_alive(pid) for pid in group.pids)


def completion_text(api, model: str, prompt: list[int], tokens: int) -> str:
    out = api.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0,
                                 extra_body={"ignore_eos": True})
    return out.choices[0].text


def chat_text(api, model: str, question: str, tokens: int) -> str:
    out = api.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], max_tokens=tokens,
                                      temperature=0, extra_body={"ignore_eos": True})
    return out.choices[0].message.content


def decoded(tok, tokens: list[int]) -> str:
    return tok.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory, smollm2_path):
    """A 6-layer random Llama (large init: well-separated logits) with SmolLM2's vocab and tokenizer."""
    from transformers import AutoTokenizer

    path = make_tiny_model(tmp_path_factory.mktemp("tiny-chat") / "m", "llama", layers=6, vocab=49152)
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(path)
    return path


@pytest.mark.slow
def test_mixed_pipelines_of_a_tiny_model_equal_transformers(tiny_chat, tmp_path):
    """mlx 0:3 + torch 3:6 through the gateway:
    float32 greedy tokens equal single-process transformers (completions and chat)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat)
    prompts = [[1, 504, 3458, 282, 4649], list(range(100, 140, 3))]
    question = "What is the capital of France?"
    chat_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False)
    expected = [decoded(tok, reference_greedy(tiny_chat, p, 8)) for p in prompts]
    expected_chat = decoded(tok, reference_greedy(tiny_chat, chat_ids, 8))
    with stack(str(tiny_chat), tmp_path) as s:
        for backends in (("mlx", "torch"),):  # torch -> MLX: the SmolLM2 test; MLX alone: the parallax up test
            s.stage(backends[0], 0, 3)
            s.stage(backends[1], 3, 6)
            s.ready()
            api = s.client()
            assert [completion_text(api, tiny_chat.name, p, 8) for p in prompts] == expected, backends
            assert chat_text(api, tiny_chat.name, question, 8) == expected_chat, backends


@pytest.mark.slow
def test_smollm2_torch_then_mlx_equals_transformers(smollm2_path, tmp_path):
    """The bundled SmolLM2 (its GGUF's Q4_1 blocks, on both backends), torch 0:15 + MLX 15:30, float32:
    16 greedy tokens of a chat and a completion equal transformers on the dequantized model."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    questions = ["What is the capital of France?"]
    chats = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                tokenize=False), add_special_tokens=False) for q in questions]
    story = tok.encode("Once upon a time")
    expected = [decoded(tok, reference_greedy(smollm2_path, p, 16)) for p in chats + [story]]
    with stack("smollm2-135m", tmp_path) as s:
        s.stage("torch", 0, 15)
        s.stage("mlx", 15, 30)
        s.ready()
        api = s.client()
        got = [chat_text(api, "smollm2-135m", q, 16) for q in questions]
        got.append(completion_text(api, "smollm2-135m", story, 16))
    assert got == expected


@pytest.mark.slow
def test_parallax_up_with_the_mlx_backend_serves_the_bundled_model(smollm2_served, tmp_path):
    """`parallax up --backend mlx` (2 MLX stages of the bundled GGUF, bf16 by default) answers a chat;
    `parallax status` shows both stages as mlx stages on the CPU."""
    import json
    import signal
    import subprocess

    import httpx

    port, nats_port, log = free_port(), free_port(), open(tmp_path / "up.log", "w")
    up = subprocess.Popen([sys.executable, "-m", "parallax.cli", "up", "--backend", "mlx", "--port", str(port),
                           "--nats-port", str(nats_port), "--stage-args", "--kv-cache-memory 0.05"],
                          stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while not _healthy(base):
            assert up.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.5)
        reply = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": "smollm2-135m", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12, "temperature": 0})
        assert reply.status_code == 200 and "Paris" in reply.json()["choices"][0]["message"]["content"], reply.text
        status = subprocess.run([sys.executable, "-m", "parallax.cli", "status", "--nats",
                                 f"nats://127.0.0.1:{nats_port}", "--json"], capture_output=True, text=True, timeout=60)
        stages = [n for n in json.loads(status.stdout)["nodes"] if n["kind"] == "stage"]
        assert sorted((n["start"], n["backend"], n["device"]) for n in stages) == [(0, "mlx", "cpu"), (15, "mlx", "cpu")]
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        log.close()


def _healthy(base: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_backend_choice_and_one_line_errors(monkeypatch):
    import importlib.util

    from parallax.broker.errors import UsageError
    from parallax.stages import cli

    monkeypatch.setattr(cli.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(cli.platform, "machine", lambda: "arm64")
    assert cli.resolve_backend("auto") == "mlx"
    monkeypatch.setattr(cli.platform, "system", lambda: "Linux")
    assert cli.resolve_backend("auto") == "torch" and cli.resolve_backend("mlx") == "mlx"
    with pytest.raises(UsageError, match="choose one of auto, torch, mlx"):
        cli.resolve_backend("cuda")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlx_lm" else real(name, *a))
    with pytest.raises(UsageError, match=r"--backend mlx needs mlx and mlx-lm \(pip install 'parallax-nats\[mlx\]'\)"):
        cli.resolve_backend("mlx")


def test_registry_and_status_show_the_backend():
    from parallax.broker.registry import NodeInfo
    from parallax.status import build_status, render_table

    old = NodeInfo.model_validate_json(b'{"node_id": "old", "model": "m", "start": 0, "end": 2, "device": "cuda:0"}')
    mlx = NodeInfo(node_id="mac", model="m", start=2, end=4, backend="mlx", device="gpu", updated=1.0)
    assert old.backend == "torch"  # records from before the field parse
    snapshot = {n.key: n.model_dump_json().encode() for n in (old, mlx)}
    rows = {line.split()[1]: line.split()[5] for line in render_table(build_status(snapshot, now=1.0)).splitlines()[1:3]}
    assert rows == {"old": "cuda:0", "mac": "mlx:gpu"}
