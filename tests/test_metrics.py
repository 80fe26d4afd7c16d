"""Prometheus metrics: the gateway's ``/metrics`` (vLLM's names, ``parallax:`` prefix), every stage's
series over NATS (``/metrics?cluster=1``, ``parallax metrics``) and on ``--metrics-port``. The values
are checked under load, not only the names: counts grow by exactly the requests sent."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import nats
import pytest
import pytest_asyncio

from parallax.broker import subjects
from parallax.broker.server import free_port
from parallax.stages.metrics import metrics_port
from parallax.watch import ask_stages
from tests.watchkit import LAYERS, MODEL, Served, samples, served, tiny_model, value

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gw(nats_module):
    async with served(nats_module, tiny_model(), slow_ms=20) as s:
        yield s


async def scrape(s: Served, cluster: bool = True) -> dict:
    response = await s.client.get("/metrics", params={"cluster": "1"} if cluster else None)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


async def first_id(lines) -> str:
    """The request id of a completion stream's first event."""
    async for line in lines:
        if line.startswith("data: {"):
            return json.loads(line.removeprefix("data: "))["id"]
    raise AssertionError("the stream ended before its first event")


def stage(scrape_: dict, name: str, layers: str) -> float:
    return value(scrape_, name, model=MODEL, layers=layers)


async def test_counts_grow_by_exactly_the_requests_sent(gw: Served):
    await gw.cluster.settled()
    before = await scrape(gw)
    prompts = [[7 + i, 40, 41, 42, 43 + i] for i in range(3)]  # different first tokens: no prefix hits
    for prompt in prompts:
        body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        assert (await gw.client.post("/v1/completions", json=body)).status_code == 200
    await gw.cluster.settled()
    after = await scrape(gw)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    n, rows = len(prompts), sum(len(p) for p in prompts)
    assert grew("parallax:request_success_total", finished_reason="length", model_name=MODEL) == n
    assert grew("parallax:request_success_total", finished_reason="abort") == 0
    assert grew("parallax:prompt_tokens_total") == rows
    assert grew("parallax:generation_tokens_total") == 4 * n
    assert grew("parallax:time_to_first_token_seconds_count") == n
    assert grew("parallax:e2e_request_latency_seconds_count") == n
    assert grew("parallax:inter_token_latency_seconds_count") == 3 * n
    assert grew("parallax:time_per_output_token_seconds_count") == n
    assert grew("parallax:e2e_request_latency_seconds_sum") > 0
    assert value(after, "parallax:num_requests_running") == 0 and value(after, "parallax:num_requests_waiting") == 0
    for layers in ("0:3", f"3:{LAYERS}"):  # every stage: the prompt rows, then one row per later token
        assert stage(after, "parallax:stage_batch_rows_sum", layers) - stage(before, "parallax:stage_batch_rows_sum", layers) == rows + 3 * n
        assert stage(after, "parallax:stage_step_seconds_count", layers) > stage(before, "parallax:stage_step_seconds_count", layers)
        assert stage(after, "parallax:stage_nats_received_bytes_total", layers) > stage(before, "parallax:stage_nats_received_bytes_total", layers)
        assert stage(after, "parallax:stage_nats_sent_bytes_total", layers) > stage(before, "parallax:stage_nats_sent_bytes_total", layers)
        assert stage(after, "parallax:stage_hop_latency_seconds_count", layers) > stage(before, "parallax:stage_hop_latency_seconds_count", layers)
        assert stage(after, "parallax:stage_kv_blocks_used", layers) == 0
        assert stage(after, "parallax:stage_kv_blocks_total", layers) == 512
    nodes = {dict(labels).get("node") for (name, labels) in after if name == "parallax:stage_kv_blocks_total"}
    assert nodes == set(gw.cluster.stages)  # one series per stage, named by node
    own = await scrape(gw, cluster=False)
    assert value(own, "parallax:stage_kv_blocks_total") == 0  # without ?cluster=1: the gateway's own only


async def test_kv_blocks_and_running_gauges_while_a_request_runs(gw: Served):
    long = {"prompt": [5, 9, 33, 101, 7], "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}
    before = await scrape(gw)
    async with gw.client.stream("POST", "/v1/completions", json=long) as response:
        lines = response.aiter_lines()
        rid = await first_id(lines)
        during = await scrape(gw)
        assert value(during, "parallax:num_requests_running", model_name=MODEL) == 1
        for layers in ("0:3", f"3:{LAYERS}"):
            assert stage(during, "parallax:stage_kv_blocks_used", layers) > 0
            assert stage(during, "parallax:stage_num_requests_running", layers) == 1
            assert 0 < stage(during, "parallax:kv_cache_usage_perc", layers) < 1
        assert (await gw.client.post(f"/v1/requests/{rid}/abort")).status_code == 200
        async for _ in lines:
            pass
    assert await gw.cluster.settled()
    after = await scrape(gw)
    assert value(after, "parallax:num_requests_running") == 0
    aborted = value(after, "parallax:request_success_total", finished_reason="abort")
    assert aborted - value(before, "parallax:request_success_total", finished_reason="abort") == 1
    assert all(stage(after, "parallax:stage_kv_blocks_used", layers) == 0 for layers in ("0:3", f"3:{LAYERS}"))


async def test_prefix_hits_count_the_reused_tokens(gw: Served):
    prompt = list(range(100, 140))  # 40 tokens: two full blocks of 16 are reused by the second request
    before = await scrape(gw)
    for _ in range(2):
        await gw.cluster.generate(prompt, max_tokens=2, ignore_eos=True)
    after = await scrape(gw)
    for layers in ("0:3", f"3:{LAYERS}"):
        assert stage(after, "parallax:prefix_cache_hits_total", layers) - stage(before, "parallax:prefix_cache_hits_total", layers) == 32


async def test_the_grafana_dashboard_uses_only_series_that_exist(gw: Served):
    dashboard = json.loads((Path(__file__).parents[1] / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"parallax:[a-z0-9_]+", expr)}
    exposed = {name for name, _ in await scrape(gw)}
    assert len(used) >= 15 and used <= exposed, used - exposed


async def test_metrics_port_and_the_command_show_every_stage(gw: Served, nats_module):
    port = free_port()
    with metrics_port(port, "127.0.0.1"):
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    served_nodes = {dict(ls).get("node") for (name, ls) in samples(text) if name == "parallax:stage_kv_blocks_total"}
    assert served_nodes == set(gw.cluster.stages)

    nc = await nats.connect(nats_module)
    try:  # ends once every serving stage answered, long before its window
        answers = await asyncio.wait_for(ask_stages(nc, subjects.METRICS, b"", wait_s=600), 60)
    finally:
        await nc.close()
    assert len(answers) == len(gw.cluster.stages)

    command = [sys.executable, "-m", "parallax.cli", "metrics", "--nats", nats_module]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    printed = samples(done.stdout)
    for node in gw.cluster.stages:
        assert value(printed, "parallax:stage_kv_blocks_total", node=node) == 512
        assert value(printed, "parallax:stage_step_seconds_count", node=node) > 0
