"""Test helpers: tiny random models and an in-process cluster of stages on a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

import nats
import numpy as np
import torch

from parallax.broker.connection import NatsOptions
from parallax.broker.wire import SamplingParams
from parallax.broker.tasks import stop_task
from parallax.gateway.nats_pipeline import NatsPipeline, PipelineConfig
from parallax.stages.backend import StepItem
from parallax.stages.engine import EngineConfig
from parallax.stages.metrics import serving
from parallax.stages.torch_backend import TorchBackend
from parallax.stages.worker import StageWorker, WorkerConfig

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, initializer_range=0.3)


def make_tiny_model(path: Path, model_type: str = "llama", layers: int = 6, tied: bool = False, vocab: int = 512) -> Path:
    """A random model with well-separated logits (large init), saved as an HF folder in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=tied, **TINY)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def reference_greedy(path: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Single-process transformers, float32: plain argmax decoding with its KV cache, no early stop
    and no logits processors (``generate(min_new_tokens=...)`` would mask EOS)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, past, out = torch.tensor([prompt]), None, []
    with torch.inference_mode():
        for _ in range(new_tokens):
            result = model(ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            out.append(int(result.logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


class Cluster:
    """Stages running as tasks of the current event loop, plus a NatsPipeline client."""

    def __init__(self, url: str, path: Path, model: str, num_layers: int):
        self.url, self.path, self.model, self.num_layers = url, path, model, num_layers
        self.stages: dict[str, tuple[asyncio.Event, asyncio.Task, StageWorker]] = {}
        self.pipeline: NatsPipeline | None = None
        self.nc = None

    async def add_stage(self, start: int, end: int, dtype: str = "float32", node_id: str | None = None,
                        engine: EngineConfig | None = None, debug_delay_ms: float = 0.0) -> str:
        backend = await asyncio.to_thread(TorchBackend.load, self.path, self.model, start, end, dtype, "cpu")
        node_id = node_id or f"s{start}-{end}-{uuid.uuid4().hex[:6]}"
        config = WorkerConfig(nats=NatsOptions(self.url), node_id=node_id, heartbeat_s=0.2, debug_delay_ms=debug_delay_ms,
                              tokenizer_path=self.path)
        worker = StageWorker(backend, config, engine or EngineConfig(kv_blocks=512))
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(worker.run(stop, ready))
        await asyncio.wait_for(ready.wait(), 30)
        self.stages[node_id] = (stop, task, worker)
        return node_id

    async def stop_stage(self, node_id: str) -> None:
        stop, task, _ = self.stages.pop(node_id)
        stop.set()
        await task

    async def kill_stage(self, node_id: str) -> None:
        """Vanish without a goodbye, like a crashed process."""
        stop, task, worker = self.stages.pop(node_id)
        await worker.nc.close()  # first: no deregistration gets out, the registry key must expire
        await stop_task(task)
        serving(worker.metrics, False)  # its process would be gone, and its series with it (stages.metrics.metrics_port)

    async def connect(self) -> NatsPipeline:
        self.nc = await nats.connect(self.url)
        self.pipeline = NatsPipeline(self.nc, PipelineConfig(model=self.model, num_layers=self.num_layers))
        await self.pipeline.start()
        return self.pipeline

    async def generate(self, prompt: list[int], **params) -> list[int]:
        params.setdefault("temperature", 0.0)
        events = [e async for e in self.pipeline.generate(uuid.uuid4().hex, prompt, SamplingParams(**params))]
        return [e.token for e in events]

    def engines(self):
        return [w.engine for _, _, w in self.stages.values()]

    async def settled(self, timeout: float = 5.0) -> bool:
        """True once every stage has released every request and KV block (release is a broadcast,
        so a stage may hear of a finish a moment after the gateway does)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(not e.seqs and not e.waiting and e.blocks.used == 0 for e in self.engines()):
                return True
            await asyncio.sleep(0.05)
        return False

    async def close(self) -> None:
        for node_id in list(self.stages):
            await self.stop_stage(node_id)
        if self.pipeline is not None:
            await self.pipeline.close()
        if self.nc is not None:
            await self.nc.close()


@contextlib.asynccontextmanager
async def cluster(url: str, path: Path, model: str, num_layers: int, ranges: list[tuple[int, int]], dtype: str = "float32",
                  engine: EngineConfig | None = None):
    c = Cluster(url, path, model, num_layers)
    try:
        for a, b in ranges:
            await c.add_stage(a, b, dtype, engine=engine)
        await c.connect()
        yield c
    finally:
        await c.close()


Step = list[tuple[str, int, int, bool]]  # (rid, pos, n, prompt) per item, in the order the backend got them


def record_steps(c: Cluster) -> dict[str, list[Step]]:
    """From now on, every step each stage's backend runs, per node id, in order."""
    steps: dict[str, list[Step]] = {}
    for node_id, (_, _, worker) in c.stages.items():
        backend, log = worker.engine.backend, steps.setdefault(node_id, [])

        def run(items, run=backend.run, log=log):
            log.append([(i.rid, i.pos, i.n, i.prompt) for i in items])
            return run(items)

        backend.run = run
    return steps


def ids(tokens) -> memoryview:
    """Token ids as a first stage's input bytes (int32)."""
    return memoryview(torch.tensor(tokens, dtype=torch.int32).numpy().tobytes())


class RowSteps:
    """Steps of a first-stage bf16 backend over token prompts, each request with its own 12 KV blocks (48
    positions at block size 4): ``item`` builds a request's rows, ``hidden`` runs one step and returns each
    request's hidden states as bf16 bits."""

    def __init__(self, backend: TorchBackend, prompts: dict[str, np.ndarray]):
        self.backend, self.prompts = backend, prompts
        self.tables = {rid: tuple(range(12 * k, 12 * k + 12)) for k, rid in enumerate(prompts)}

    def item(self, rid: str, pos: int, n: int, token: int | None = None) -> StepItem:
        data = ids(self.prompts[rid][pos : pos + n]) if token is None else ids([token])
        return StepItem(rid, pos, n, data, "int32", None, self.tables[rid], prompt=token is None)

    def hidden(self, items: list[StepItem]) -> dict[str, np.ndarray]:
        out = self.backend.run(items)
        rows = np.frombuffer(out.hidden, np.uint16).reshape(-1, out.row_bytes // 2)
        offsets = np.cumsum([0] + [i.n for i in items])
        return {i.rid: rows[a:b] for i, a, b in zip(items, offsets, offsets[1:])}
