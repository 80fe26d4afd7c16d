"""Real processes: nats-server, parallax-stage x2 and parallax-gateway on free loopback ports,
driven by the official openai client. Every process is stopped by PID at the end."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import httpx
import openai
import pytest

from parallax.broker.registry import DEAD_NODE_NOTICED_S
from parallax.broker.server import EmbeddedServer, ServerConfig, free_port
from parallax.procs import ProcessGroup, pid_alive

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CHAIN_WAIT_S = 2.0  # how long the gateway waits for a replica of a dead stage's layers


def wait_health(base: str, group: ProcessGroup, want: int = 200, timeout: float = 180) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (dead := group.exited()) is not None:
            raise RuntimeError(f"{dead.name} exited with {dead.returncode}")
        try:
            r = httpx.get(f"{base}/health", timeout=2)
            if r.status_code == want:
                return r
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"/health never returned {want}")


@pytest.fixture(scope="module")
def stack(smollm2_path, tmp_path_factory):
    """nats-server + gateway started first (503), then the two stages (200)."""
    logs = tmp_path_factory.mktemp("logs")
    with EmbeddedServer(ServerConfig(port=free_port())) as srv, ProcessGroup() as group:
        port = free_port()
        base = f"http://127.0.0.1:{port}"

        def start(name, module, *args):
            out = open(logs / f"{name}.log", "w")
            return group.spawn(name, [sys.executable, "-m", module, "--model", MODEL, "--nats", srv.url, *args], stdout=out, stderr=out)

        start("gateway", "parallax.gateway.cli", "--port", str(port), "--chain-wait", str(CHAIN_WAIT_S))
        unavailable = wait_health(base, group, want=503)
        stages = {
            "stage-0": start("stage-0", "parallax.stages.cli", "--layers", "0:15", "--dtype", "float32", "--node-id", "e2e-a"),
            "stage-1": start("stage-1", "parallax.stages.cli", "--layers", "15:30", "--dtype", "float32", "--node-id", "e2e-b"),
        }
        wait_health(base, group)
        yield {"base": base, "group": group, "stages": stages, "unavailable": unavailable, "logs": logs}
    for child in group.children:
        assert not pid_alive(child.pid), f"{child.name} still running"


def client(stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack['base']}/v1", api_key="none", max_retries=0, timeout=120)


def test_gateway_says_which_layers_are_missing(stack):
    body = stack["unavailable"].json()
    assert "0:30" in body["error"]["message"]


async def test_openai_client_streams_a_chat_completion(stack):
    stream = await client(stack).chat.completions.create(
        model=MODEL, messages=QUESTION, stream=True, temperature=0, max_tokens=32,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0


async def test_concurrent_streams_equal_one_at_a_time(stack):
    api = client(stack)
    questions = [f"Tell me a fact about the number {i}." for i in range(4)]

    async def ask(q):
        stream = await api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": q}], stream=True, temperature=0, max_tokens=16)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    alone = [await ask(q) for q in questions]
    together = await asyncio.gather(*(ask(q) for q in questions))
    assert list(together) == alone
    assert len(set(alone)) > 1


async def test_long_prompt_is_chunked_over_nats(stack):
    prompt = "The quick brown fox jumps over the lazy dog. " * 120  # ~1,200 tokens: 3 prompt chunks, ~2.8 MB per hop
    out = await client(stack).completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert out.usage.prompt_tokens >= 1150
    assert out.usage.completion_tokens == 4


async def test_completions_seed_and_stop(stack):
    api = client(stack)
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=1.0, seed=11)
    a, b = await api.completions.create(**kwargs), await api.completions.create(**kwargs)
    assert a.choices[0].text == b.choices[0].text
    greedy = (await api.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0)).choices[0].text
    stop = greedy.split()[2]
    cut = await api.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0, stop=[stop])
    assert stop not in cut.choices[0].text and greedy.startswith(cut.choices[0].text)


async def test_bad_requests_get_openai_errors(stack):
    api = client(stack)
    with pytest.raises(openai.NotFoundError):
        await api.chat.completions.create(model="nope", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):
        await api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=0)
    with pytest.raises(openai.BadRequestError):
        await api.chat.completions.create(model=MODEL, messages=QUESTION, logprobs=True, top_logprobs=21)
    r = httpx.post(f"{stack['base']}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


async def test_killed_stage_mid_stream_gives_an_error_in_bounded_time(stack):
    """Runs last in this module: it kills stage 1 (SIGKILL) while a stream is running; with no
    replica of its layers, the stream fails once the gateway's --chain-wait is over."""
    api = client(stack)
    stream = await api.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 1000."}], stream=True,
        temperature=0, max_tokens=2000, extra_body={"ignore_eos": True})
    started = None
    with pytest.raises((openai.APIError, httpx.HTTPError)) as info:
        async for chunk in stream:
            if started is None:
                stack["stages"]["stage-1"].proc.send_signal(signal.SIGKILL)
                started = time.monotonic()
    assert time.monotonic() - started < DEAD_NODE_NOTICED_S + CHAIN_WAIT_S  # the README's bound
    assert "stopped" in str(info.value) or "15:30" in str(info.value)
    r = httpx.get(f"{stack['base']}/health", timeout=5)
    deadline = time.monotonic() + 10
    while r.status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.5)
        r = httpx.get(f"{stack['base']}/health", timeout=5)
    assert r.status_code == 503 and "15:30" in r.json()["error"]["message"]
