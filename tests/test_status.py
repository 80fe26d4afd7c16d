"""``parallax status``: the pure status/table functions on hand-made snapshots, and the command
against a real nats-server (JSON and table), without JetStream, and with nothing listening."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import nats
import pytest
from parallax.broker.kv import nodes_bucket
from parallax.broker.server import free_port
from parallax.broker.registry import Assignment, Load, NodeInfo
from parallax.scheduler.graph import disjoint_chains

from parallax.status import (
    assignment_text,
    build_status,
    coverage,
    human_bytes,
    render_json,
    render_table,
)
from tests.conftest import start_nats_server

MODEL = "smollm2-135m"
NOW = 1_700_000_000.0


def stage(node_id: str, layers: tuple[int, int] | None, num_layers: int = 30, model: str = MODEL,
          **kw) -> NodeInfo:
    start, end = layers or (None, None)
    kw.setdefault("updated", NOW)
    return NodeInfo(node_id=node_id, model=model, start=start, end=end, num_layers=num_layers, **kw)


def snap(*nodes: NodeInfo, **extra: bytes) -> dict[str, bytes]:
    out = {n.key: n.model_dump_json().encode() for n in nodes}
    out.update({k.replace("__", "."): v for k, v in extra.items()})
    return out


def assign(node_id: str, start: int, end: int, model: str = MODEL) -> bytes:
    return Assignment(node_id=node_id, model=model, start=start, end=end, epoch=1, scheduler="s1").model_dump_json().encode()


def by_id(status: dict) -> dict[str, dict]:
    return {d["node_id"]: d for d in status["nodes"]}


# --- pure functions ------------------------------------------------------------------------------
def test_coverage_counts_replicas_per_boundary_segment():
    status = build_status(snap(stage("a", (0, 15)), stage("b", (0, 15)), stage("c", (15, 30))), now=NOW)
    m = status["models"][MODEL]
    assert m["num_layers"] == 30
    assert m["coverage"] == [{"start": 0, "end": 15, "replicas": 2}, {"start": 15, "end": 30, "replicas": 1}]
    assert m["missing"] == [] and m["complete"] is True and m["pipelines"] == 1
    text = render_table(status)
    assert f"{MODEL}: 30 layers; 0:15 x2, 15:30 x1; complete pipelines: 1" in text
    assert "MISSING" not in text


def test_missing_range_is_named():
    status = build_status(snap(stage("a", (0, 15)), stage("b", (0, 10))), now=NOW)
    m = status["models"][MODEL]
    assert m["coverage"] == [{"start": 0, "end": 10, "replicas": 2}, {"start": 10, "end": 15, "replicas": 1},
                             {"start": 15, "end": 30, "replicas": 0}]
    assert m["missing"] == [[15, 30]] and m["complete"] is False and m["pipelines"] == 0
    assert "15:30 x0; complete pipelines: 0; MISSING 15:30" in render_table(status)


def test_covered_but_not_joined_is_missing_too():
    # every layer is covered, but 0:10 and 5:30 do not join: routing names the gap after the chain
    m = build_status(snap(stage("a", (0, 10)), stage("b", (5, 30))), now=NOW)["models"][MODEL]
    assert all(c["replicas"] > 0 for c in m["coverage"])
    assert m["complete"] is False and m["missing"] == [[10, 30]]


def test_only_serving_stages_count():
    nodes = [stage("a", (0, 30)), stage("b", (0, 30), state="loading"), stage("c", None, state="waiting"),
             NodeInfo(node_id="g", kind="gateway", model=MODEL, num_layers=30, updated=NOW)]
    m = build_status(snap(*nodes), now=NOW)["models"][MODEL]
    assert m["coverage"] == [{"start": 0, "end": 30, "replicas": 1}] and m["pipelines"] == 1


@pytest.mark.parametrize("ranges, expected", [
    ([(0, 15), (0, 15), (15, 30), (15, 30)], 2),
    ([(0, 30), (0, 15), (15, 30)], 2),
    ([(0, 10), (10, 30), (0, 20), (20, 30)], 2),
    ([(0, 10), (0, 20), (10, 30)], 1),  # 0:20 leads nowhere
    ([(0, 10), (10, 20)], 0),
    ([], 0),
])
def test_disjoint_pipelines(ranges, expected):
    assert disjoint_chains(ranges, 30) == expected


def test_coverage_cuts_at_every_boundary():
    assert coverage([(0, 10), (5, 30)], 30) == [
        {"start": 0, "end": 5, "replicas": 1}, {"start": 5, "end": 10, "replicas": 2},
        {"start": 10, "end": 30, "replicas": 1}]
    assert coverage([], 4) == [{"start": 0, "end": 4, "replicas": 0}]


def test_stale_health():
    status = build_status(snap(stage("fresh", (0, 30), updated=NOW - 1), stage("old", (0, 30), updated=NOW - 60)),
                          now=NOW)
    nodes = by_id(status)
    assert nodes["fresh"]["health"] == "ok" and nodes["old"]["health"] == "stale"
    rows = {line.split()[1]: line for line in render_table(status).splitlines() if line.startswith("stage")}
    assert " ok " in rows["fresh"] and " stale " in rows["old"]


def test_assignment_column_only_when_it_differs():
    nodes = [stage("same", (0, 15)), stage("moving", (0, 15)), stage("new", None, state="loading")]
    status = build_status(snap(*nodes, assign__same=assign("same", 0, 15), assign__moving=assign("moving", 10, 20),
                               assign__new=assign("new", 15, 30)), now=NOW)
    nodes = by_id(status)
    assert nodes["same"]["assignment"]["start"] == 0 and assignment_text(nodes["same"]) == ""
    assert assignment_text(nodes["moving"]) == "-> 10:20 (pending)"
    assert assignment_text(nodes["new"]) == "-> 15:30 (loading)"
    rows = {line.split()[1]: line for line in render_table(status).splitlines() if line.startswith("stage")}
    assert rows["new"].endswith("-> 15:30 (loading)") and rows["same"].endswith(" ok      -")
    assert build_status(snap(stage("x", (0, 30))), now=NOW)["nodes"][0]["assignment"] is None


def test_table_columns():
    node = stage("s0", (0, 15), memory_offered=int(1.2 * 2**30), layer_ms=0.5, version="0.1.0", device="cuda:0",
                 dtype="bfloat16", load=Load(running=3, waiting=1, kv_blocks_used=25, kv_blocks_total=100))
    lines = render_table(build_status(snap(node), now=NOW)).splitlines()
    assert lines[0].split() == ["KIND", "NODE", "MODEL", "LAYERS", "STATE", "DEVICE", "DTYPE", "MEMORY", "LOAD",
                                "LAYER_MS", "HEALTH", "VERSION", "ASSIGNMENT"]
    assert lines[1].split() == ["stage", "s0", MODEL, "0:15", "serving", "cuda:0", "bfloat16", "1.2", "GiB", "3/1",
                                "kv", "25%", "0.50", "ok", "0.1.0"]
    assert human_bytes(0) == "-" and human_bytes(512) == "512 B" and human_bytes(3 * 2**20) == "3.0 MiB"


def test_leader_line():
    assert render_table(build_status(snap(stage("a", (0, 30))), now=NOW)).endswith(
        "no scheduler (assignments stay as they are)")
    sched = NodeInfo(node_id="s1", kind="scheduler", updated=NOW)
    status = build_status(snap(stage("a", (0, 30)), sched, leader=b"s1"), now=NOW)
    assert status["leader"] == "s1" and "leader scheduler: s1" in render_table(status)


def test_json_shape_and_model_filter():
    nodes = [stage("b", (15, 30)), stage("a", (0, 15)), stage("o", (0, 4), num_layers=8, model="other"),
             NodeInfo(node_id="s1", kind="scheduler", updated=NOW)]
    status = build_status(snap(*nodes, assign__a=assign("a", 0, 10), leader=b"s1", stage__broken=b"{"), now=NOW)
    data = json.loads(render_json(status))
    assert set(data) >= {"nodes", "models", "leader"}
    assert [d["node_id"] for d in data["nodes"]] == ["o", "a", "b", "s1"]  # stages by model and layer, then the rest
    a = data["nodes"][1]
    assert a["kind"] == "stage" and a["start"] == 0 and a["end"] == 15 and a["load"]["running"] == 0
    assert a["assignment"] == {"node_id": "a", "model": MODEL, "start": 0, "end": 10, "epoch": 1, "scheduler": "s1"}
    assert data["models"][MODEL] == {
        "num_layers": 30, "coverage": [{"start": 0, "end": 15, "replicas": 1}, {"start": 15, "end": 30, "replicas": 1}],
        "missing": [], "complete": True, "pipelines": 1}
    assert data["models"]["other"]["missing"] == [[4, 8]] and data["leader"] == "s1"
    assert data["invalid"] == ["stage.broken"]
    assert render_json(status) == render_json(build_status(dict(reversed(list(snap(*nodes).items()))) | {
        "assign.a": assign("a", 0, 10), "leader": b"s1", "stage.broken": b"{"}, now=NOW))  # stable order

    only = build_status(snap(*nodes), model="other", now=NOW)
    assert [d["node_id"] for d in only["nodes"]] == ["o", "s1"] and list(only["models"]) == ["other"]
    unknown = build_status(snap(*nodes), model="nope", now=NOW)
    assert unknown["models"] == {"nope": {"num_layers": 0, "coverage": [], "missing": [], "complete": False,
                                          "pipelines": 0}}
    assert "nope: no serving stages" in render_table(unknown)


def test_empty_snapshot():
    status = build_status({}, now=NOW)
    assert status == {"nodes": [], "models": {}, "leader": None, "invalid": []}
    assert render_table(status).startswith("no nodes registered")


# --- the command ---------------------------------------------------------------------------------
def parallax(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``parallax ...`` as a child process; subprocess.run kills and reaps it on timeout."""
    return subprocess.run([sys.executable, "-m", "parallax.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


async def _register(url: str, entries: dict[str, bytes], ttl: dict[str, int]) -> None:
    nc = await nats.connect(url)
    try:
        kv = await nodes_bucket(nc)
        for key, value in entries.items():
            if key in ttl:
                await kv.create(key, value, msg_ttl=ttl[key])
            else:
                await kv.put(key, value)
    finally:
        await nc.close()


async def test_status_against_a_real_server(nats_url):
    empty = parallax("status", "--nats", nats_url)
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.strip() == "no nodes registered"

    now = time.time()
    nodes = [stage("st-a", (0, 15), updated=now), stage("st-b", (0, 15), updated=now),
             stage("st-c", None, state="loading", updated=now),
             NodeInfo(node_id="gw-1", kind="gateway", model=MODEL, num_layers=30, updated=now),
             NodeInfo(node_id="sch-1", kind="scheduler", updated=now)]
    entries = snap(*nodes, leader=b"sch-1") | {"assign.st-c": assign("st-c", 15, 30)}
    await _register(nats_url, entries, ttl={n.key: 60 for n in nodes})

    done = parallax("status", "--nats", nats_url, "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert {d["node_id"] for d in data["nodes"]} == {"st-a", "st-b", "st-c", "gw-1", "sch-1"}
    assert data["leader"] == "sch-1"
    assert next(d for d in data["nodes"] if d["node_id"] == "st-c")["assignment"]["start"] == 15
    m = data["models"][MODEL]
    assert m["coverage"] == [{"start": 0, "end": 15, "replicas": 2}, {"start": 15, "end": 30, "replicas": 0}]
    assert m["missing"] == [[15, 30]] and m["complete"] is False

    table = parallax("status", "--nats", nats_url)
    assert table.returncode == 0, table.stderr
    for node_id in ("st-a", "st-b", "st-c", "gw-1", "sch-1"):
        assert node_id in table.stdout
    assert f"{MODEL}: 30 layers; 0:15 x2, 15:30 x0; complete pipelines: 0; MISSING 15:30" in table.stdout
    assert "-> 15:30 (loading)" in table.stdout and "leader scheduler: sch-1" in table.stdout

    filtered = json.loads(parallax("status", "--nats", nats_url, "--json", "--model", "other").stdout)
    assert [d["node_id"] for d in filtered["nodes"]] == ["sch-1"]


def test_unreachable_nats_is_one_line_and_exit_2():
    url = f"nats://127.0.0.1:{free_port()}"
    done = parallax("status", "--nats", url, "--timeout", "1", timeout=30)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == f"parallax: error: cannot reach NATS at {url} within 1 s (TimeoutError)"


def test_server_without_jetstream_is_one_line_and_exit_2():
    server = start_nats_server(jetstream=False)
    try:
        done = parallax("status", "--nats", server.url, "--timeout", "2", timeout=30)
    finally:
        server.stop()
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("parallax: error:") and "JetStream" in lines[0]


def test_kernel_choices_show_one_line_per_stage_that_reports_them():
    picks = {"1536x576 q4_1 decode": "numba", "1536x576 q4_1 prompt": "tile"}
    status = build_status(snap(stage("a", (0, 15), kernels=picks), stage("b", (15, 30))), now=NOW)
    assert by_id(status)["a"]["kernels"] == picks and by_id(status)["b"]["kernels"] == {}
    lines = [line for line in render_table(status).splitlines() if line.startswith("kernels")]
    assert lines == ["kernels a: 1536x576 q4_1 decode numba, 1536x576 q4_1 prompt tile"]
