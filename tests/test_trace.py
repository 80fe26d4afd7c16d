"""Traces: a request's W3C trace context (``traceparent`` from the HTTP request, else a new one) rides
the NATS headers of its messages through every hop; each stage records its spans (hop, queue,
compute, send) in a ring and answers ``parallax.trace``; ``parallax trace`` prints the hops."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import nats
import orjson
import pytest
import pytest_asyncio

from parallax.broker import subjects
from parallax.broker.observe import TraceContext, gather, parse_trace_header, trace_header
from tests.watchkit import LAYERS, Served, served, tiny_model

pytestmark = pytest.mark.asyncio(loop_scope="module")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
PROMPT = [11, 12, 13, 14, 15]
TOKENS = 4


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gw(nats_module):
    async with served(nats_module, tiny_model()) as s:
        yield s


async def ask_stages(url: str, query: bytes) -> list[dict]:
    nc = await nats.connect(url)
    try:
        return [orjson.loads(r) for r in await gather(nc, subjects.TRACE, query, wait_s=1.0, expected=2)]
    finally:
        await nc.close()


async def complete(gw: Served, headers: dict[str, str] | None = None):
    body = {"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
    response = await gw.client.post("/v1/completions", json=body, headers=headers)
    assert response.status_code == 200
    await gw.cluster.settled()
    return response


async def test_the_trace_crosses_every_hop_and_each_stage_records_its_spans(gw: Served, nats_module):
    response = await complete(gw, {"traceparent": PARENT})
    rid = response.json()["id"]
    echoed = TraceContext.parse(response.headers["traceparent"])
    assert echoed.trace_id == TRACE_ID and echoed.span_id != PARENT.split("-")[2]  # the gateway's own span

    stages = sorted(await ask_stages(nats_module, orjson.dumps({"id": rid})), key=lambda s: s["start"])
    assert [(s["start"], s["end"]) for s in stages] == [(0, 3), (3, LAYERS)]
    for s in stages:
        assert {span["trace_id"] for span in s["spans"]} == {TRACE_ID} and {span["rid"] for span in s["spans"]} == {rid}
        kinds = [span["kind"] for span in s["spans"]]
        compute = [span for span in s["spans"] if span["kind"] == "compute"]
        assert len(compute) == TOKENS and sum(span["rows"] for span in compute) == len(PROMPT) + TOKENS - 1
        assert kinds.count("queue") == TOKENS
        assert all(span["end"] >= span["start"] for span in s["spans"])
    first, last = (s["spans"] for s in stages)
    # stage 0: the prompt from the gateway (no hop time sent), then the tokens from stage 1; it sends a
    # forward per pass. Stage 1: every pass comes from stage 0; it sends each token to the gateway
    # and all but the last one back to stage 0.
    assert [k["kind"] for k in first].count("hop") == TOKENS - 1 and [k["kind"] for k in last].count("hop") == TOKENS
    assert [k["kind"] for k in first].count("send") == TOKENS and [k["kind"] for k in last].count("send") == 2 * TOKENS - 1
    by_trace = await ask_stages(nats_module, orjson.dumps({"id": TRACE_ID}))
    assert sorted(len(s["spans"]) for s in by_trace) == sorted(len(s["spans"]) for s in stages)

    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "parallax.cli", "trace", rid, "--nats",
                                                    nats_module, "--spans"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"request {rid}: trace {TRACE_ID}; tries {rid}"
    assert lines[1].split() == ["LAYERS", "NODE", "PASSES", "ROWS", "HOP_MS", "QUEUE_MS", "COMPUTE_MS", "SEND_MS",
                                "FIRST_MS", "LAST_MS"]
    rows = [line.split() for line in lines[2:4]]
    assert [r[0] for r in rows] == ["0:3", f"3:{LAYERS}"] and [r[2] for r in rows] == [str(TOKENS)] * 2
    assert rows[0][3] == rows[1][3] == str(len(PROMPT) + TOKENS - 1) and rows[0][4] != "-"
    assert sum(" compute " in line for line in lines) == 2 * TOKENS  # --spans: every span


async def test_a_request_without_traceparent_gets_a_new_trace_and_bad_queries_get_errors(gw: Served, nats_module):
    response = await complete(gw)
    trace = TraceContext.parse(response.headers["traceparent"])
    assert trace is not None and trace.trace_id != TRACE_ID
    stages = await ask_stages(nats_module, orjson.dumps({"id": response.json()["id"]}))
    assert len(stages) == 2 and all({s["trace_id"] for s in st["spans"]} == {trace.trace_id} for st in stages)
    for query in (b"nonsense", b'{"id": 3}', b"[]"):
        answers = await ask_stages(nats_module, query)
        assert len(answers) == 2 and all("error" in a for a in answers)
    assert (await complete(gw)).status_code == 200  # the stages keep serving

    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "parallax.cli", "trace", "no-such-request",
                                                    "--nats", nats_module, "--wait", "0.5"],
                                   capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().startswith("parallax: error: no stage has spans of 'no-such-request' (2 stages answered")


async def test_traceparent_values_and_the_header():
    assert TraceContext.parse(PARENT) == TraceContext(TRACE_ID, "00f067aa0ba902b7", "01")
    for bad in (None, "", "garbage", f"ff-{TRACE_ID}-00f067aa0ba902b7-01", f"00-{'0' * 32}-00f067aa0ba902b7-01",
                f"00-{TRACE_ID}-{'0' * 16}-01", f"00-{TRACE_ID[:-1]}-00f067aa0ba902b7-01"):
        assert TraceContext.parse(bad) is None, bad
    a, b = TraceContext.new(), TraceContext.new()
    assert a.trace_id != b.trace_id and a.child().trace_id == a.trace_id and a.child().span_id != a.span_id
    assert parse_trace_header(trace_header({"r1": a, "r2~1": b})) == {"r1": a, "r2~1": b}
    assert parse_trace_header({"Px-Trace": "r1=bad,=x,r2=" + PARENT}) == {"r2": TraceContext.parse(PARENT)}
    assert trace_header({}) == {} and parse_trace_header(None) == {}


async def test_spans_go_to_opentelemetry_as_children_of_the_sending_span(gw: Served):
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from parallax.stages.otel import OtelSpans, from_env

    assert from_env({}) is None  # off without an endpoint
    exporting = from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"})
    assert isinstance(exporting, OtelSpans)
    exporting.close()  # nothing recorded: nothing sent
    memory = InMemorySpanExporter()
    sink = OtelSpans(memory)
    workers = [w for _, _, w in gw.cluster.stages.values()]
    try:
        for worker in workers:
            worker.tracer.export = sink
        rid = (await complete(gw, {"traceparent": PARENT})).json()["id"]
    finally:
        for worker in workers:
            worker.tracer.export = None
        sink.close()
    spans = memory.get_finished_spans()
    assert spans and {s.context.trace_id for s in spans} == {int(TRACE_ID, 16)}
    assert {s.attributes["parallax.rid"] for s in spans} == {rid}
    assert {s.name for s in spans} == {"hop", "queue", "compute", "send"}
    assert {s.attributes["parallax.layers"] for s in spans} == {"0:3", f"3:{LAYERS}"}
    assert all(s.parent is not None and s.parent.is_remote and s.end_time >= s.start_time for s in spans)
    assert sum(s.attributes.get("parallax.rows", 0) for s in spans) == 2 * (len(PROMPT) + TOKENS - 1)


async def test_an_answer_too_large_for_one_message_keeps_the_latest_spans():
    from parallax.broker.wire import Forward, ForwardItem
    from parallax.stages.trace import TraceRecorder

    recorder = TraceRecorder(capacity=5000)
    ctx = TraceContext.parse(PARENT)
    header = Forward(items=(ForwardItem(rid="r", pos=0, n=1),), dtype="int32", shape=(1,), sent=1.0)
    recorder.received(header, trace_header({"r": ctx}), now=1.5)
    for step in range(2000):
        recorder.step([("r", 1), ("untraced", 1)], started=2.0 + step, seconds=0.5)
    whole = orjson.loads(recorder.answer(b'{"id": "r"}', {"node_id": "n"}, limit=10 << 20))
    assert whole["dropped"] == 0 and len(whole["spans"]) == 2002  # hop, queue, 2000 compute
    assert {s["rid"] for s in whole["spans"]} == {"r"}
    body = recorder.answer(b'{"id": "r"}', {"node_id": "n"}, limit=20_000)
    cut = orjson.loads(body)
    assert len(body) <= 20_000 and cut["dropped"] > 0 and cut["dropped"] + len(cut["spans"]) == 2002
    assert cut["spans"][-1] == whole["spans"][-1]  # the latest are kept
