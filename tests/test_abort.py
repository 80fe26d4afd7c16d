"""Abort (``POST /v1/requests/{id}/abort``) and per-request deadlines, through HTTP: a real uvicorn
gateway app on a NatsPipeline, stages in process on a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn

from parallax.gateway.app import create_app
from tests.cluster import Cluster, cluster, make_tiny_model

pytestmark = pytest.mark.slow  # the app needs SmolLM2's tokenizer
LAYERS = 6
LONG = {"prompt": [5, 9, 33, 101, 7], "max_tokens": 3000, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", layers=LAYERS)


@contextlib.asynccontextmanager
async def gateway(c: Cluster, tokenizer, request_timeout_s: float | None = None) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(c.pipeline, tokenizer, "tiny", 4096, [], request_timeout_s)
    server = uvicorn.Server(uvicorn.Config(app, port=0, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        await serving


@contextlib.asynccontextmanager
async def slow_cluster(nats_url, tiny) -> AsyncIterator[Cluster]:
    """Two stages, the last one slow on purpose (a long request is still running seconds later)."""
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3)]) as c:
        await c.add_stage(3, 6, debug_delay_ms=20)
        await asyncio.sleep(0.5)  # the gateway's registry sees the new stage
        yield c


def busy(c: Cluster) -> bool:
    return any(e.seqs or e.blocks.used for e in c.engines())


async def sse(response: httpx.Response) -> AsyncIterator[dict]:
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line.removeprefix("data: "))


async def test_abort_ends_a_stream_and_frees_every_stage(nats_url, tiny, smollm2_tokenizer):
    async with slow_cluster(nats_url, tiny) as c, gateway(c, smollm2_tokenizer) as client:
        async with client.stream("POST", "/v1/completions", json=LONG | {"stream": True}) as response:
            events = sse(response)
            first = await anext(events)
            rid = first["id"]
            assert busy(c)
            aborted = await client.post(f"/v1/requests/{rid}/abort")
            assert aborted.status_code == 200 and aborted.json() == {"id": rid, "object": "request.abort", "aborted": True}
            rest = [e async for e in events]
        assert rest[-1]["error"]["code"] == "request_aborted" and rid in rest[-1]["error"]["message"]
        assert sum(1 for e in rest if "choices" in e) < 200  # ended long before max_tokens
        assert await c.settled()  # every stage released the request's KV
        gone = await client.post(f"/v1/requests/{rid}/abort")  # finished requests are unknown
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "request_not_found"


async def test_abort_of_a_non_streaming_request(nats_url, tiny, smollm2_tokenizer):
    async with slow_cluster(nats_url, tiny) as c, gateway(c, smollm2_tokenizer) as client:
        pending = asyncio.create_task(client.post("/v1/completions", json=LONG))
        while not c.pipeline._requests:  # running in the pipeline: its id is the response's id
            await asyncio.sleep(0.01)
        rid = next(iter(c.pipeline._requests))
        assert (await client.post(f"/v1/requests/{rid}/abort")).status_code == 200
        response = await pending
        assert response.status_code == 499 and response.json()["error"]["code"] == "request_aborted"
        assert await c.settled()


async def test_abort_of_an_unknown_request_is_404(nats_url, tiny, smollm2_tokenizer):
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 6)]) as c, gateway(c, smollm2_tokenizer) as client:
        response = await client.post("/v1/requests/cmpl-nope/abort")
        assert response.status_code == 404
        assert response.json()["error"] == {"message": "no running request `cmpl-nope` on this gateway", "type": "NotFoundError",
                                             "param": "request_id", "code": "request_not_found"}


async def test_timeout_in_the_body(nats_url, tiny, smollm2_tokenizer):
    async with slow_cluster(nats_url, tiny) as c, gateway(c, smollm2_tokenizer) as client:
        started = time.monotonic()
        response = await client.post("/v1/completions", json=LONG | {"timeout": 1.5})
        assert time.monotonic() - started >= 1.5
        assert response.status_code == 504
        error = response.json()["error"]
        assert error["code"] == "request_timeout" and "timeout of 1.5 s" in error["message"]
        assert await c.settled()
        async with client.stream("POST", "/v1/completions", json=LONG | {"timeout": 1.5, "stream": True}) as streamed:
            events = [e async for e in sse(streamed)]
        assert any("choices" in e for e in events) and events[-1]["error"]["code"] == "request_timeout"
        assert await c.settled()
        quick = await client.post("/v1/completions", json=LONG | {"max_tokens": 3, "timeout": 60})
        assert quick.status_code == 200 and quick.json()["usage"]["completion_tokens"] == 3
        for bad in (0, -1, "soon"):
            invalid = await client.post("/v1/completions", json=LONG | {"timeout": bad})
            assert invalid.status_code == 400 and invalid.json()["error"]["param"] == "timeout"


async def test_gateway_default_timeout(nats_url, tiny, smollm2_tokenizer):
    async with slow_cluster(nats_url, tiny) as c, gateway(c, smollm2_tokenizer, request_timeout_s=1.0) as client:
        response = await client.post("/v1/completions", json=LONG)
        assert response.status_code == 504 and "timeout of 1 s" in response.json()["error"]["message"]
        longer = await client.post("/v1/completions", json=LONG | {"max_tokens": 100, "timeout": 120})  # the body wins
        assert longer.status_code == 200 and longer.json()["usage"]["completion_tokens"] == 100
        assert await c.settled()
    with pytest.raises(ValueError, match="positive"):
        create_app(c.pipeline, smollm2_tokenizer, "tiny", 4096, [], 0)
