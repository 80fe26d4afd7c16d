"""Drain (SIGTERM on a stage): no new requests; running ones finish here when no other stage serves
the range (up to the drain timeout), or resume at once on a replica; then the stage exits.

In process (stages as tasks on a real nats-server, like tests/cluster.py) for the logic, and real
``parallax-stage`` processes for the signals and the exit code. Every process is stopped by PID.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid
from dataclasses import replace

import nats
import pytest

from parallax.broker.connection import NatsOptions
from parallax.broker.errors import ChainUnavailable, StageFailed
from parallax.broker.kv import nodes_bucket
from parallax.broker.registry import Assignment, assign_key
from parallax.broker.wire import SamplingParams
from parallax.gateway.nats_pipeline import NatsPipeline, PipelineConfig
from parallax.procs import ProcessGroup, pid_alive
from parallax.stages.auto import AutoStage
from parallax.stages.engine import EngineConfig
from parallax.stages.profile import model_profile
from parallax.stages.torch_backend import TorchBackend
from parallax.stages.worker import NodeFacts, StageWorker, WorkerConfig
from tests.cluster import Cluster, cluster, make_tiny_model, reference_greedy

LAYERS = 6
PROMPT = [5, 9, 33, 101, 7]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", layers=LAYERS)


async def add_drainable(c: Cluster, start: int, end: int, drain_timeout_s: float = 60.0,
                        debug_delay_ms: float = 0.0) -> tuple[str, asyncio.Event, asyncio.Task]:
    """A stage like ``Cluster.add_stage`` whose ``drain`` event plays the part of SIGTERM; the
    cluster's close stops it as any other."""
    backend = await asyncio.to_thread(TorchBackend.load, c.path, c.model, start, end, "float32", "cpu")
    node_id = f"d{start}-{end}-{uuid.uuid4().hex[:6]}"
    config = WorkerConfig(nats=NatsOptions(c.url), node_id=node_id, heartbeat_s=0.2, debug_delay_ms=debug_delay_ms,
                          drain_timeout_s=drain_timeout_s)
    worker = StageWorker(backend, config, EngineConfig(kv_blocks=512))
    stop, drain, ready = asyncio.Event(), asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(worker.run(stop, ready, drain))
    await asyncio.wait_for(ready.wait(), 30)
    c.stages[node_id] = (stop, task, worker)
    return node_id, drain, task


async def refusing(engine, timeout_s: float = 10.0) -> None:
    """Until a drained stage has read the registry, found no replica and refuses new requests (the
    drain starts at the signal, the refusal once the registry has been read)."""
    deadline = time.monotonic() + timeout_s
    while engine.draining is None:
        assert time.monotonic() < deadline, "the drain never began refusing new requests"
        await asyncio.sleep(0.01)


async def wait_registered(c: Cluster, count: int) -> None:
    while len(c.pipeline.registry.serving("tiny")) < count:
        await asyncio.sleep(0.05)


def stream(c: Cluster, tokens: int):
    return c.pipeline.generate(uuid.uuid4().hex, PROMPT, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))


async def test_without_a_replica_the_running_stream_finishes_and_new_requests_fail(nats_url, tiny):
    """The only stage of 3:6 drains mid-stream: the stream ends with the undisturbed tokens, the
    stage stops only after its last token, and a request sent meanwhile fails at once saying why."""
    expected = reference_greedy(tiny, PROMPT, 80)
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3)]) as c:
        node_id, drain, task = await add_drainable(c, 3, 6, debug_delay_ms=10)
        await wait_registered(c, 2)
        running = stream(c, 80)
        tokens = [(await anext(running)).token for _ in range(10)]
        drain.set()
        await refusing(c.stages[node_id][2].engine)
        with pytest.raises(StageFailed, match=f"stage {node_id} is shutting down and takes no new requests"):
            await c.generate(PROMPT, max_tokens=5)
        while len(tokens) < 70:
            tokens.append((await anext(running)).token)
        assert not task.done()  # ten tokens still to compute: the stage is still draining
        tokens += [e.token async for e in running]
        assert tokens == expected
        await asyncio.wait_for(task, 30)  # the drain ends once the stream is done: run() returns
        assert task.exception() is None
        c.stages.pop(node_id)
        assert await c.settled()


async def test_the_drain_timeout_hands_the_rest_back(nats_url, tiny):
    """A drain shorter than the stream: the rest is handed back (``preempted``) when it is over, and
    the stream resumes, with its tokens so far, on a stage that starts later."""
    expected = reference_greedy(tiny, PROMPT, 120)
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3)]) as c:
        c.pipeline.config = replace(c.pipeline.config, chain_wait_s=60)
        node_id, drain, task = await add_drainable(c, 3, 6, drain_timeout_s=0.5, debug_delay_ms=20)
        await wait_registered(c, 2)
        running = stream(c, 120)
        tokens = [(await anext(running)).token for _ in range(5)]
        drain.set()
        await asyncio.wait_for(task, 30)
        c.stages.pop(node_id)
        assert len(tokens) < 120
        await c.add_stage(3, 6)
        tokens += [e.token async for e in running]
        assert tokens == expected
        assert await c.settled()


async def test_with_a_replica_the_running_stream_moves_there_at_once(nats_url, tiny):
    """Two replicas of 3:6; the one serving the stream drains: it hands the stream back and stops
    at once (long before the stream ends), and the stream ends on the other with the undisturbed tokens."""
    expected = reference_greedy(tiny, PROMPT, 300)
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3)]) as c:
        replicas = [await add_drainable(c, 3, 6, debug_delay_ms=10) for _ in range(2)]
        await wait_registered(c, 3)
        running = stream(c, 300)
        tokens = [(await anext(running)).token for _ in range(10)]
        node_id, drain, task = next(r for r in replicas if c.stages[r[0]][2].engine.seqs)
        other = next(r for r in replicas if r[0] != node_id)
        drain.set()
        while not task.done():
            tokens.append((await anext(running)).token)
        assert len(tokens) < 300  # it stopped while the stream was still running
        assert task.exception() is None
        c.stages.pop(node_id)
        tokens += [e.token async for e in running]
        assert tokens == expected
        assert c.stages[other[0]][2].engine.stats.steps > 0
        assert await c.settled()


async def start_placed(c: Cluster, node_id: str, start: int, end: int,
                       tiny) -> tuple[AutoStage, asyncio.Event, asyncio.Event, asyncio.Task]:
    """An :class:`AutoStage` (``parallax-stage`` without ``--layers``) assigned ``start:end`` through its
    registry key, as the scheduler does; returns it, its stop and drain events (SIGTERM) and its task."""
    facts = NodeFacts(manual=False, profile=model_profile(tiny, "float32"), memory_offered=1 << 30)
    config = WorkerConfig(nats=NatsOptions(c.url), node_id=node_id, heartbeat_s=0.2, debug_delay_ms=10)
    stage = AutoStage("tiny", LAYERS, "cpu", "float32", lambda a, b: TorchBackend.load(tiny, "tiny", a, b, "float32", "cpu"),
                      lambda b: EngineConfig(kv_blocks=256), config, facts)
    stop, drain, ready = asyncio.Event(), asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(stage.run(stop, ready, drain))
    await asyncio.wait_for(ready.wait(), 30)
    assignment = Assignment(node_id=node_id, model="tiny", start=start, end=end)
    await (await nodes_bucket(c.nc)).put(assign_key(node_id), assignment.model_dump_json().encode())
    return stage, stop, drain, task


async def test_a_stage_placed_by_the_scheduler_drains_like_one_given_layers(nats_url, tiny):
    """A placed stage (no ``--layers``), the only one of 3:6, drains mid-stream: new requests fail
    with the reason, the stream ends here with the undisturbed tokens, then the stage returns (the
    hand-over to a replica is the same code: StageWorker.leave)."""
    expected = reference_greedy(tiny, PROMPT, 80)
    async with cluster(nats_url, tiny, "tiny", LAYERS, [(0, 3)]) as c:
        stage, stop, drain, task = await start_placed(c, "placed", 3, 6, tiny)
        try:
            await wait_registered(c, 2)
            running = stream(c, 80)
            tokens = [(await anext(running)).token for _ in range(10)]
            drain.set()
            await refusing(stage.worker.engine)
            with pytest.raises(StageFailed, match="stage placed is shutting down and takes no new requests"):
                await c.generate(PROMPT, max_tokens=5)
            while len(tokens) < 70:
                tokens.append((await anext(running)).token)
            assert not task.done()  # still draining: its stream is not over
            tokens += [e.token async for e in running]
            assert tokens == expected
            await asyncio.wait_for(task, 30)
            assert task.exception() is None
            assert await c.settled()
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


# --------------------------------------------------------------------------- real processes, signals
@pytest.mark.slow
async def test_sigterm_drains_the_stage_process_and_it_exits_0(nats_url, tiny, tmp_path):
    """``parallax-stage`` processes, the only one of 3:6 gets SIGTERM mid-stream: the stream ends
    with the undisturbed tokens and the process exits 0 after it. Then a fresh 3:6 and a request,
    SIGTERM twice: the process hands the request back and exits 0 at once, the request fails clearly."""
    expected = reference_greedy(tiny, PROMPT, 150)
    with ProcessGroup() as group:
        def start(name: str, layers: str):
            out = open(tmp_path / f"{name}.log", "w")
            return group.spawn(name, [sys.executable, "-m", "parallax.stages.cli", "--model", str(tiny), "--nats", nats_url,
                                      "--layers", layers, "--dtype", "float32", "--node-id", name, "--threads", "1",
                                      "--debug-delay-ms", "20"], stdout=out, stderr=out)

        start("a", "0:3")
        b = start("b", "3:6")
        nc = await nats.connect(nats_url)
        pipeline = NatsPipeline(nc, PipelineConfig(model=tiny.name, num_layers=LAYERS, chain_wait_s=1))
        await pipeline.start()
        try:
            await ready(pipeline, group, 2, tiny.name)
            running = pipeline.generate("r1", PROMPT, SamplingParams(temperature=0, max_tokens=150, ignore_eos=True))
            tokens = [(await anext(running)).token for _ in range(10)]
            b.proc.send_signal(signal.SIGTERM)
            while len(tokens) < 140:
                tokens.append((await anext(running)).token)
            assert b.returncode is None  # still draining
            tokens += [e.token async for e in running]
            assert tokens == expected
            assert await asyncio.to_thread(b.proc.wait, 60) == 0

            b2 = start("b2", "3:6")
            await ready(pipeline, group, 2, tiny.name, exited_ok={"b"})
            running = pipeline.generate("r2", PROMPT, SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True))
            await anext(running)
            b2.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            b2.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(b2.proc.wait, 30) == 0
            # handed back with no other 3:6: it waits chain_wait_s for one (as for a dead stage), then fails
            with pytest.raises((StageFailed, ChainUnavailable), match="layers 3:6"):
                async for _ in running:
                    pass
        finally:
            await pipeline.close()
            await nc.close()
    for child in group.children:
        assert not pid_alive(child.pid), f"{child.name} still running"


async def ready(pipeline: NatsPipeline, group: ProcessGroup, stages: int, model: str, exited_ok: frozenset | set = frozenset()) -> None:
    """Until ``stages`` stages of ``model`` are registered; a child that exits (but ``exited_ok``) fails it."""
    for _ in range(1200):
        dead = [ch for ch in group.children if ch.returncode is not None and ch.name not in exited_ok]
        if dead:
            raise RuntimeError(f"{dead[0].name} exited with {dead[0].returncode}")
        if len(pipeline.registry.serving(model)) == stages:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("the stages never registered")
