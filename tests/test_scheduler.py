"""The scheduler with real processes: stages started without --layers get ranges, the cluster heals
after a SIGKILL, and a second scheduler takes over when the leader dies. Plus the leader lock itself.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from parallax.broker.kv import nodes_bucket, watch_nodes
from parallax.broker.wire import SamplingParams
from parallax.gateway.nats_pipeline import NatsPipeline, PipelineConfig
from parallax.broker.registry import LEADER_KEY, Registry
from parallax.scheduler.routing import find_chain
from parallax.scheduler.service import Scheduler, SchedulerConfig
from parallax.stages.profile import model_profile
from parallax.broker.model import resolve_model
from tests.cluster import reference_greedy
from tests.processes import wait_gone

LAYERS = 6
KV_TOKENS = 100_000  # a big KV reserve per layer, so that memory, not the embeddings, limits a node
PROMPT = [1, 5, 9, 200, 31, 7]
NEW_TOKENS = 12


def stage_cmd(url: str, model: Path, node_id: str, memory: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "parallax.stages.cli", "--model", str(model), "--nats", url, "--node-id", node_id,
           "--dtype", "float32", "--kv-cache-memory", "0.01", "--log-level", "WARNING"]
    return cmd + (["--memory", f"{memory}B"] if memory else [])


def scheduler_cmd(url: str, node_id: str) -> list[str]:
    return [sys.executable, "-m", "parallax.scheduler.cli", "--nats", url, "--node-id", node_id, "--hop-ms", "0",
            "--kv-reserve-tokens", str(KV_TOKENS), "--log-level", "INFO"]


class Procs:
    """Child processes by name, their output in ``logs/<name>.log``; every one is killed and reaped
    at the end (and the logs printed, which pytest shows when a test fails)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str]) -> None:
        with open(self.logs / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait(10)
        assert wait_gone(proc.pid)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        for log in sorted(self.logs.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture
def procs(tmp_path: Path):
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


class Watcher:
    """The registry as the gateway sees it, plus a pipeline to send requests."""

    def __init__(self, url: str, model: str):
        self.url, self.model = url, model

    async def __aenter__(self) -> "Watcher":
        self.nc = await nats.connect(self.url)
        self.kv = await nodes_bucket(self.nc)
        self.registry = Registry()
        self.task = asyncio.create_task(watch_nodes(self.kv, self.registry))
        self.pipeline = NatsPipeline(self.nc, PipelineConfig(model=self.model, num_layers=LAYERS, chain_wait_s=5))
        await self.pipeline.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.pipeline.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.nc.close()

    def ranges(self) -> dict[str, tuple[int, int]]:
        return {n.node_id: n.layers for n in self.registry.serving(self.model)}

    async def until(self, check, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = await check()
            if result:
                return result
            await asyncio.sleep(0.25)
        raise AssertionError(f"{what}: not within {timeout:.0f} s; registry: {self.ranges()}")

    async def answer(self) -> list[int] | None:
        """Greedy tokens for PROMPT, or None while the cluster cannot answer."""
        try:
            events = [e async for e in self.pipeline.generate(f"r{time.monotonic_ns()}", PROMPT,
                                                              SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))]
        except Exception:
            return None
        return [e.token for e in events]

    async def leader(self) -> str | None:
        try:
            entry = await self.kv.get(LEADER_KEY)
        except Exception:
            return None
        return entry.value.decode() if entry.value else None


def assert_one_chain(ranges: dict[str, tuple[int, int]]) -> None:
    """Every layer served exactly once, in order, by the serving stages."""
    chain = sorted(ranges.values())
    assert chain[0][0] == 0 and chain[-1][1] == LAYERS
    assert all(a[1] == b[0] for a, b in zip(chain, chain[1:])), chain


@pytest.mark.slow
async def test_stages_without_layers_serve_and_heal_after_sigkill(nats_url, tiny_model_dir, procs):
    name = resolve_model(str(tiny_model_dir)).name
    profile = model_profile(tiny_model_dir, "float32")
    per_layer = profile.layer_bytes + profile.kv_bytes_per_token * KV_TOKENS
    memory = 3 * per_layer + profile.first_bytes + (1 << 20)  # at most 3 layers (+ one end's extras) per node
    expected = reference_greedy(tiny_model_dir, PROMPT, NEW_TOKENS)
    procs.start("scheduler", scheduler_cmd(nats_url, "sched-a"))
    for node in ("a", "b", "c"):
        procs.start(node, stage_cmd(nats_url, tiny_model_dir, node, memory))
    async with Watcher(nats_url, name) as w:
        async def serving():  # 2 or 3 stages: how many depends on the speeds they measured
            return len(w.registry.nodes(name)) == 3 and find_chain(w.ranges().values(), LAYERS) is not None
        await w.until(serving, 90, "the stages serving one chain")
        assert_one_chain(w.ranges())
        assert len(w.ranges()) >= 2  # nobody can hold all 6 layers
        assert await w.answer() == expected

        victim = max(w.ranges(), key=lambda n: w.ranges()[n][0])
        procs.kill(victim)
        killed = time.monotonic()

        async def healed():
            return victim not in w.ranges() and await w.answer()
        assert await w.until(healed, 30, "the cluster heals after a SIGKILL") == expected
        assert time.monotonic() - killed < 30
        assert_one_chain(w.ranges())
        assert len(w.ranges()) == 2  # a spare took the lost layers, or the two left split them


@pytest.mark.slow
async def test_a_second_scheduler_takes_over(nats_url, tiny_model_dir, procs):
    name = resolve_model(str(tiny_model_dir)).name
    procs.start("sched-a", scheduler_cmd(nats_url, "sched-a"))
    async with Watcher(nats_url, name) as w:
        await w.until(lambda: _eq(w.leader(), "sched-a"), 30, "sched-a leads")
        procs.start("sched-b", scheduler_cmd(nats_url, "sched-b"))
        procs.start("one", stage_cmd(nats_url, tiny_model_dir, "one"))
        await w.until(lambda: _is(w.ranges().get("one") == (0, LAYERS)), 90, "stage one serves every layer")

        procs.kill("sched-a")
        await w.until(lambda: _eq(w.leader(), "sched-b"), 15, "sched-b takes the lead")
        assert w.ranges()["one"] == (0, LAYERS)  # serving went on without a scheduler
        procs.start("two", stage_cmd(nats_url, tiny_model_dir, "two"))
        await w.until(lambda: _is(w.ranges().get("two") == (0, LAYERS)), 90, "the new leader places stage two")
        assert await w.answer() == reference_greedy(tiny_model_dir, PROMPT, NEW_TOKENS)


async def _eq(value, expected) -> bool:
    return (await value) == expected


async def _is(value: bool) -> bool:
    return value


async def test_leader_lock_is_exclusive_refreshed_and_expires(nats_url):
    nc = await nats.connect(nats_url)
    try:
        kv = await nodes_bucket(nc)
        a = Scheduler(SchedulerConfig(nats_url=nats_url, node_id="a", lock_ttl_s=1, heartbeat_s=0.3))
        b = Scheduler(SchedulerConfig(nats_url=nats_url, node_id="b", lock_ttl_s=1, heartbeat_s=0.3))
        assert await a._hold_lock(kv)
        a.leading = True
        assert not await b._hold_lock(kv)
        assert await a._hold_lock(kv)  # refresh by compare-and-set
        assert (await kv.get(LEADER_KEY)).value == b"a"
        await asyncio.sleep(2.5)  # a stops refreshing: the key expires
        assert await b._hold_lock(kv)
        assert not await a._hold_lock(kv)  # a's revision is stale now
    finally:
        await nc.close()


@pytest.mark.slow  # tiny_model_dir: needs the SmolLM2 conversion (its tokenizer)
async def test_a_stage_moved_to_other_layers_hands_its_requests_back_and_they_finish(nats_url, tiny_model_dir, caplog):
    """A running stream survives its stage being moved: the stage loads the new range, hands the
    request back (preempted), the gateway resumes it on the new chain with the tokens so far."""
    from parallax.broker.registry import Assignment, assign_key
    from parallax.stages.auto import AutoStage
    from parallax.stages.engine import EngineConfig
    from parallax.stages.torch_backend import TorchBackend
    from parallax.stages.worker import NodeFacts, WorkerConfig
    from tests.cluster import Cluster

    def load(start: int, end: int):
        return TorchBackend.load(tiny_model_dir, "tiny", start, end, "float32", "cpu")

    facts = NodeFacts(manual=False, profile=model_profile(tiny_model_dir, "float32"), memory_offered=1 << 30)
    stage = AutoStage("tiny", LAYERS, "cpu", "float32", load, lambda b: EngineConfig(kv_blocks=256),
                      WorkerConfig(nats_url=nats_url, node_id="mover", heartbeat_s=0.2), facts)
    stop = asyncio.Event()
    task = asyncio.create_task(stage.run(stop))

    c = Cluster(nats_url, tiny_model_dir, "tiny", LAYERS)
    nc = await nats.connect(nats_url)
    try:
        kv = await nodes_bucket(nc)
        await kv.put(assign_key("mover"), Assignment(node_id="mover", model="tiny", start=0, end=LAYERS).model_dump_json().encode())
        pipeline = await c.connect()
        deadline = time.monotonic() + 30
        while pipeline.missing() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
        stream = pipeline.generate("moving", PROMPT, params)
        tokens = [(await stream.__anext__()).token for _ in range(5)]
        await c.add_stage(3, LAYERS, node_id="tail")  # by hand, like --layers 3:6
        await kv.put(assign_key("mover"), Assignment(node_id="mover", model="tiny", start=0, end=3, epoch=1).model_dump_json().encode())
        tokens += [e.token async for e in stream]
        assert tokens == reference_greedy(tiny_model_dir, PROMPT, 300)
        assert "request moving: stage mover left layers 0:6: moved to layers 0:3" in caplog.text
        assert stage.worker.spec.start == 0 and stage.worker.spec.end == 3
        assert c.engines()[0].stats.steps > 0  # the tail stage served the resumed request
    finally:
        stop.set()
        await task
        await c.close()
        await nc.close()
