"""Requests survive a dying stage: the gateway resumes them, with their tokens so far, on live replicas.

Real processes (nats-server, four ``parallax-stage`` and a ``parallax-gateway``) for the chaos test;
an in-process cluster for the only replica replaced within the deadline. Every process is stopped by PID.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import nats
import orjson
import pytest

from parallax.broker import subjects
from parallax.broker.server import free_port
from parallax.broker.wire import SamplingParams
from parallax.procs import ProcessGroup, pid_alive
from tests.cluster import cluster, make_tiny_model, reference_greedy
from tests.conftest import start_nats_server

pytestmark = pytest.mark.slow  # real processes, and the gateway needs SmolLM2's tokenizer
LAYERS = 6  # tiny_model_dir
NEW_TOKENS = 100
PROMPTS = [[(i * 131 + j * 17) % 40000 + 100 for j in range(4 + 3 * i)] for i in range(16)]  # 16 concurrent streams
RANGES = {"a0": "0:3", "a1": "0:3", "b0": "3:6", "b1": "3:6"}  # node id -> layers: two replicas of each range


@dataclass
class Stream:
    """One streamed completion: the text of every SSE event, and when it came."""

    events: list[tuple[float, str]] = field(default_factory=list)
    error: dict | None = None

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.events)

    def longest_gap_after(self, t: float) -> float:
        """The longest wait between two events (or from ``t`` to one) that ended after ``t``."""
        times = [t] + [when for when, _ in self.events if when > t]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)


async def stream_completion(client: httpx.AsyncClient, prompt: list[int], into: Stream) -> Stream:
    body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                into.error = chunk["error"]
            elif chunk["choices"]:
                into.events.append((time.monotonic(), chunk["choices"][0]["text"]))
    return into


async def stage_stats(nc) -> dict[str, dict]:
    """Every stage's counters (``parallax.stats``), by node id."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subjects.STATS, b"{}", reply=inbox)
    found: dict[str, dict] = {}
    deadline = time.monotonic() + 1.0
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = await sub.next_msg(timeout=left)
        except (asyncio.TimeoutError, nats.errors.TimeoutError):
            break
        stats = orjson.loads(msg.data)
        found[stats["node_id"]] = stats
    await sub.unsubscribe()
    return found


async def wait_ready(base: str, nc, group: ProcessGroup, stages: int, timeout: float = 300) -> None:
    """Until the gateway answers /health with 200 and ``stages`` stages answer their stats."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=2) as client:
        while time.monotonic() < deadline:
            if (dead := group.exited()) is not None:
                raise RuntimeError(f"{dead.name} exited with {dead.returncode}")
            try:
                healthy = (await client.get("/health")).status_code == 200
            except httpx.HTTPError:
                healthy = False
            if healthy and len(await stage_stats(nc)) == stages:
                return
            await asyncio.sleep(0.3)
    raise TimeoutError("the cluster never became ready")


async def chaos_round(base: str, nc, group: ProcessGroup, layers: str, expected: list[str], logs: Path) -> float:
    """Stream every prompt at once; once all are under way, SIGKILL the replica of ``layers`` that
    serves the most of them. Every stream must end with exactly its undisturbed text, no error.
    Returns the longest wait for a token after the kill (detection + re-prefill of a cut-off stream)."""
    streams = [Stream() for _ in PROMPTS]
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        tasks = [asyncio.create_task(stream_completion(client, p, s)) for p, s in zip(PROMPTS, streams)]
        while not all(len(s.events) >= 10 for s in streams):
            assert not any(t.done() for t in tasks), "a stream ended before the kill: make NEW_TOKENS larger"
            await asyncio.sleep(0.02)
        stats = await stage_stats(nc)
        victim = max((n for n in stats if RANGES.get(n) == layers), key=lambda n: stats[n]["running"])
        assert stats[victim]["running"] > 0, stats
        child = next(c for c in group.children if c.name == victim)
        child.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    for stream, want in zip(streams, expected):
        assert stream.error is None, stream.error
        assert stream.text == want
    gateway_log = (logs / "gateway.log").read_text()
    assert f"stage {victim} serving layers {layers} stopped" in gateway_log and "resuming on live replicas" in gateway_log
    return max(s.longest_gap_after(killed) for s in streams)


async def test_streams_survive_a_killed_replica_of_the_first_and_of_the_last_range(tiny_model_dir, tmp_path, smollm2_tokenizer):
    """Two replicas of each of two ranges; SIGKILL a first-range replica mid-stream, then a
    last-range one: every greedy stream finishes with the text an undisturbed run gives."""
    references = [smollm2_tokenizer.decode(reference_greedy(tiny_model_dir, p, NEW_TOKENS)) for p in PROMPTS]
    server = start_nats_server()
    try:
        with ProcessGroup() as group:
            port = free_port()
            base = f"http://127.0.0.1:{port}"

            def start(name: str, module: str, *args: str) -> None:
                out = open(tmp_path / f"{name}.log", "w")
                group.spawn(name, [sys.executable, "-m", module, "--model", str(tiny_model_dir), "--nats", server.url, *args],
                            stdout=out, stderr=out)

            start("gateway", "parallax.gateway.cli", "--port", str(port))
            for node_id, layers in RANGES.items():  # a step delay keeps the streams running long enough to be cut
                start(node_id, "parallax.stages.cli", "--layers", layers, "--dtype", "float32", "--node-id", node_id,
                      "--threads", "1", "--debug-delay-ms", "5")
            nc = await nats.connect(server.url)
            try:
                await wait_ready(base, nc, group, len(RANGES))
                undisturbed = [Stream() for _ in PROMPTS]
                async with httpx.AsyncClient(base_url=base, timeout=120) as client:
                    await asyncio.gather(*(stream_completion(client, p, s) for p, s in zip(PROMPTS, undisturbed)))
                assert [s.text for s in undisturbed] == references
                first = await chaos_round(base, nc, group, "0:3", references, tmp_path)
                last = await chaos_round(base, nc, group, "3:6", references, tmp_path)
                print(f"\nlongest wait for a token after the kill: {first:.2f} s (first range), {last:.2f} s (last range)")
            finally:
                await nc.close()
        for child in group.children:
            assert not pid_alive(child.pid), f"{child.name} still running"
    finally:
        server.stop()


# ------------------------------------------------------------------------ in process, one replica
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", layers=LAYERS)


async def test_the_only_replica_replaced_within_the_deadline(nats_url, tiny):
    """The only stage of 3:6 dies mid-stream; a new one starts before ``chain_wait_s`` is over: the
    stream goes on and ends with the undisturbed tokens, and no stage keeps the request's KV."""
    prompt = [5, 9, 33, 101, 7]
    expected = reference_greedy(tiny, prompt, 60)
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3), (3, 6)]) as c:
        c.pipeline.config = replace(c.pipeline.config, chain_wait_s=60)
        stream = c.pipeline.generate(uuid.uuid4().hex, prompt, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
        tokens = [(await anext(stream)).token for _ in range(10)]
        await c.kill_stage(next(n for n in c.stages if n.startswith("s3-6")))
        while not c.pipeline.missing():  # the registry noticed: no stage serves 3:6
            await asyncio.sleep(0.05)
        await c.add_stage(3, 6)
        events = [e async for e in stream]
        assert tokens + [e.token for e in events] == expected
        assert [e.index for e in events] == list(range(10, 60)) and events[-1].finish == "length"
        assert await c.settled()
