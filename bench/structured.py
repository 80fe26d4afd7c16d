"""Structured outputs: what the token mask costs.

    python -m bench.structured masks        # per-token mask cost of each grammar library installed
    python -m bench.structured throughput   # concurrency 16: no request constrained vs half of them

``masks``: SmolLM2's tokenizer (49152 tokens); one JSON schema; each library's compile time and the
time to fill the next-token mask at every token of a valid answer (xgrammar, llguidance,
outlines-core: whichever imports). ``throughput``: one in-process stage serving SmolLM2 (the
bundled GGUF) on an embedded nats-server, the gateway app in process, 32 chat requests at
concurrency 16 with temperature 0: first none constrained, then every other one by a JSON schema.
Both print one markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "maxItems": 3}}}
ANSWER = {"name": "Alice Smith", "age": 42, "tags": ["a", "ccc"]}


def _smollm2() -> Path:
    from parallax.broker.model import resolve_model

    return resolve_model("smollm2-135m").path


# ----------------------------------------------------------------------------------- masks
def _per_token(fill: Callable[[], None], accept: Callable[[int], None], ids: list[int]) -> list[float]:
    times = []
    for token in ids:
        started = time.perf_counter()
        fill()
        times.append(time.perf_counter() - started)
        accept(token)
    return times


def _xgrammar(tokenizer, schema: str, ids: list[int]) -> tuple[float, list[float]]:
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer)), max_threads=1)
    started = time.perf_counter()
    compiled = compiler.compile_json_schema(schema, any_whitespace=False)
    compile_s = time.perf_counter() - started
    matcher, bitmask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, len(tokenizer))
    return compile_s, _per_token(lambda: matcher.fill_next_token_bitmask(bitmask), matcher.accept_token, ids)


def _llguidance(tokenizer, schema: str, ids: list[int]) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lgt

    info = llguidance.hf.from_tokenizer(tokenizer)
    started = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False,
                                                                              "item_separator": ", ", "key_separator": ": "})
    matcher = llguidance.LLMatcher(info, grammar)
    compile_s = time.perf_counter() - started
    bitmask = lgt.allocate_token_bitmask(1, info.vocab_size)
    return compile_s, _per_token(lambda: lgt.fill_next_token_bitmask(matcher, bitmask, 0), matcher.consume_token, ids)


def _outlines(tokenizer, schema: str, ids: list[int]) -> tuple[float, list[float]]:
    import numpy as np
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    vocabulary = Vocabulary(tokenizer.eos_token_id, _byte_vocab(tokenizer))
    started = time.perf_counter()
    index = Index(build_regex_from_schema(schema, whitespace_pattern=r"[ ]?"), vocabulary)
    compile_s = time.perf_counter() - started
    guide = Guide(index)
    mask = np.zeros((len(tokenizer) + 31) // 32, dtype=np.int32)  # [ceil(V / 32)] bits
    return compile_s, _per_token(lambda: guide.write_mask_into(mask.ctypes.data, mask.size, 4), guide.advance, ids)


def _byte_vocab(tokenizer) -> dict[bytes, list[int]]:
    """Byte-level BPE token strings back to bytes (GPT-2's byte <-> unicode table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    to_byte = {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(extra)}
    vocab: dict[bytes, list[int]] = {}
    for text, token in tokenizer.get_vocab().items():
        if token != tokenizer.eos_token_id and all(c in to_byte for c in text):
            vocab.setdefault(bytes(to_byte[c] for c in text), []).append(token)
    return vocab


def masks() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_smollm2())
    schema = json.dumps(SCHEMA)
    ids = tokenizer.encode(json.dumps(ANSWER), add_special_tokens=False)
    print(f"SmolLM2 vocabulary {len(tokenizer)}, answer {len(ids)} tokens\n")
    print("| library | compile ms | mask ms/token mean | median | max (after the first) |\n|---|---|---|---|---|")
    for name, run in (("xgrammar", _xgrammar), ("llguidance", _llguidance), ("outlines-core", _outlines)):
        try:
            compile_s, times = run(tokenizer, schema, ids)
        except ImportError as exc:
            print(f"| {name} | not installed ({exc.name}) | | | |")
            continue
        ms = [t * 1e3 for t in times[1:]]  # the first fill warms caches up
        print(f"| {name} | {compile_s * 1e3:.1f} | {statistics.mean(ms):.3f} | {statistics.median(ms):.3f} | {max(ms):.3f} |")


# ------------------------------------------------------------------------------ throughput
async def _load(client, constrained: Callable[[int], bool], requests: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}

    async def one(k: int) -> int:
        extra = {"response_format": fmt} if constrained(k) else {}
        async with gate:
            out = await client.chat.completions.create(
                model="smollm2-135m", messages=[{"role": "user", "content": f"Describe person number {k} as JSON."}],
                max_tokens=max_tokens, temperature=0.0, **extra)
        if constrained(k) and out.choices[0].finish_reason == "stop":
            json.loads(out.choices[0].message.content)  # a finished constrained answer always parses
        return out.usage.completion_tokens

    started = time.perf_counter()
    tokens = await asyncio.gather(*(one(k) for k in range(requests)))
    wall = time.perf_counter() - started
    return {"tokens": sum(tokens), "wall_s": wall, "tok_s": sum(tokens) / wall}


async def throughput(requests: int, concurrency: int, max_tokens: int) -> None:
    import httpx
    import nats
    import openai
    from transformers import AutoTokenizer

    from parallax.broker.connection import NatsOptions
    from parallax.broker.model import eos_token_ids
    from parallax.broker.server import EmbeddedServer, ServerConfig, free_port
    from parallax.gateway.app import create_app
    from parallax.gateway.nats_pipeline import NatsPipeline, PipelineConfig
    from parallax.stages.engine import EngineConfig
    from parallax.stages.torch_backend import TorchBackend
    from parallax.stages.worker import StageWorker, WorkerConfig

    path = _smollm2()
    server = EmbeddedServer(ServerConfig(port=free_port())).start()
    stop, ready = asyncio.Event(), asyncio.Event()
    try:
        backend = await asyncio.to_thread(TorchBackend.load, path, "smollm2-135m", 0, 30, "float32", "cpu")
        config = WorkerConfig(nats=NatsOptions(server.url), node_id=f"bench-{uuid.uuid4().hex[:6]}", tokenizer_path=path)
        worker = StageWorker(backend, config, EngineConfig(kv_blocks=2048))
        task = asyncio.create_task(worker.run(stop, ready))
        await asyncio.wait_for(ready.wait(), 60)
        nc = await nats.connect(server.url)
        pipeline = NatsPipeline(nc, PipelineConfig(model="smollm2-135m", num_layers=30))
        await pipeline.start()
        app = create_app(pipeline, AutoTokenizer.from_pretrained(path), "smollm2-135m", 2048, eos_token_ids(path))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=600) as http:
            client = openai.AsyncOpenAI(base_url="http://gw/v1", api_key="x", http_client=http, max_retries=0)
            await _load(client, lambda k: k % 2 == 0, 4, 4, 8)  # warm-up: the stage loads xgrammar and the tokenizer
            rows = [("none", await _load(client, lambda k: False, requests, concurrency, max_tokens)),
                    ("half (JSON schema)", await _load(client, lambda k: k % 2 == 0, requests, concurrency, max_tokens))]
        await pipeline.close()
        await nc.close()
    finally:
        stop.set()
        if ready.is_set():
            await task
        server.stop()
    print(f"SmolLM2-135M (Q4_1 GGUF), one stage, {requests} requests at concurrency {concurrency}, max_tokens {max_tokens}\n")
    print("| constrained | tokens | wall s | tok/s |\n|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['tokens']} | {r['wall_s']:.1f} | {r['tok_s']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["masks", "throughput"])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    if args.what == "masks":
        masks()
    else:
        asyncio.run(throughput(args.requests, args.concurrency, args.max_tokens))


if __name__ == "__main__":
    main()
