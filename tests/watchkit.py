"""Helpers of the watch tests (metrics, web page, traces): a word-level tokenizer for the tiny random
models (no SmolLM2 conversion needed), a 2-stage cluster in process with the gateway app served by
uvicorn on a free port, and a Prometheus scrape parser."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from parallax.gateway.app import create_app
from parallax.gateway.watch import Watch, add_watch_routes
from tests.cluster import Cluster, cluster, make_tiny_model

LAYERS = 6
VOCAB = 512
MODEL = "tiny"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


@functools.cache
def tiny_model() -> Path:
    """The tiny random Llama of every watch test, made once per process (removed at exit)."""
    folder = Path(tempfile.mkdtemp(prefix="parallax-watch-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return make_tiny_model(folder / "llama", layers=LAYERS, vocab=VOCAB)


def word_tokenizer(vocab: int = VOCAB):
    """Words ``w0``..``w{vocab-1}``, one token each, joined by spaces; a plain chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", chat_template=CHAT_TEMPLATE)


@dataclass
class Served:
    cluster: Cluster
    url: str  # the gateway's base URL
    client: httpx.AsyncClient


@contextlib.asynccontextmanager
async def served(nats_url: str, model_dir: Path, slow_ms: float = 0.0) -> AsyncIterator[Served]:
    """Stages 0:3 and 3:6 (the last one ``slow_ms`` slower per step) and a gateway app with its watch
    routes, on uvicorn."""
    async with cluster(nats_url, model_dir, MODEL, LAYERS, [(0, 3)]) as c:
        await c.add_stage(3, LAYERS, debug_delay_ms=slow_ms)
        while len(c.pipeline.registry.serving(MODEL)) < 2:  # the gateway's view has both stages
            await asyncio.sleep(0.05)
        app = create_app(c.pipeline, word_tokenizer(), MODEL, 4096, [])
        add_watch_routes(app, Watch(c.nc, c.pipeline.registry, nats_url=nats_url))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                await asyncio.sleep(0.01)
            port = server.servers[0].sockets[0].getsockname()[1]
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                yield Served(c, url, client)
        finally:
            server.should_exit = True
            await serving


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """A scrape as ``{(sample name, labels): value}``."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scrape: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in scrape.items() if n == name and want <= ls)
