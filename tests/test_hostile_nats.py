"""Hostile NATS input: malformed, truncated, oversized, wrong-dtype, replayed and out-of-order frames
published straight to the stages' and the gateway's subjects of a live cluster.

The cluster (two in-process stages of a tiny random Llama, 0:3 and 3:6, and a NatsPipeline on a real
nats-server) runs in a background event loop for the whole module, so that hypothesis can drive sync
tests against it. After each hostile frame the receiver logs one line, answers on the frame's reply
subject with an error when it has one, and keeps serving: a normal request sent alongside completes
with the reference greedy tokens.
"""

from __future__ import annotations

import logging
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import nats
import numpy as np
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parallax.broker import subjects
from parallax.broker.chunks import ID, PART, Reassembler
from parallax.broker.errors import WireError
from parallax.broker.wire import (
    MAGIC, ErrorMsg, Forward, ForwardItem, Release, RequestMeta, SamplingParams, TokenOut, Tokens, decode, encode,
)
from tests.cluster import Cluster, make_tiny_model, reference_greedy
from tests.conftest import start_nats_server

LAYERS, MODEL = 6, "tiny"
PROMPT = [5, 9, 33, 101, 7, 250]
NEW = 12
REPLY_TIMEOUT_S = 10


@dataclass
class Live:
    portal: BlockingPortal
    cluster: Cluster
    nc: nats.NATS  # the test's own connection, for hostile frames
    reference: list[int]

    def stage_subject(self, start: int) -> str:
        for node_id, (_, _, worker) in self.cluster.stages.items():
            if worker.spec.start == start:
                return subjects.node(MODEL, worker.spec.start, worker.spec.end, node_id)
        raise KeyError(start)

    def node_id(self, start: int) -> str:
        return next(n for n, (_, _, w) in self.cluster.stages.items() if w.spec.start == start)

    def request(self, subject: str, payload: bytes, headers: dict | None = None) -> ErrorMsg:
        """Publish with a reply subject; the answer must be an error."""
        reply = self.portal.call(lambda: self.nc.request(subject, payload, timeout=REPLY_TIMEOUT_S, headers=headers))
        header, _ = decode(reply.data)
        assert isinstance(header, ErrorMsg), header
        return header

    def publish(self, subject: str, payload: bytes, headers: dict | None = None) -> None:
        async def send():
            await self.nc.publish(subject, payload, headers=headers)
            await self.nc.flush()

        self.portal.call(send)

    def generate(self, prompt: list[int] = PROMPT, **params) -> list[int]:
        return self.portal.call(lambda: self.cluster.generate(prompt, max_tokens=NEW, ignore_eos=True, **params))

    def start_generate(self):
        return self.portal.start_task_soon(lambda: self.cluster.generate(PROMPT, max_tokens=NEW, ignore_eos=True))

    @staticmethod
    def until(done, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)

    def settled(self) -> bool:
        return self.portal.call(self.cluster.settled)

    def collect(self, subject: str):
        """A subscription on ``subject`` and the decoded messages it got so far."""
        got: list = []

        async def on(msg):
            got.append(decode(msg.data)[0])

        sub = self.portal.call(lambda: self.nc.subscribe(subject, cb=on))
        self.portal.call(self.nc.flush)
        return sub, got


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Live]:
    path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", layers=LAYERS)
    reference = reference_greedy(path, PROMPT, NEW)
    server = start_nats_server()
    try:
        with start_blocking_portal() as portal:
            c = Cluster(server.url, path, MODEL, LAYERS)
            try:
                portal.call(c.add_stage, 0, 3)
                portal.call(c.add_stage, 3, 6)
                portal.call(c.connect)
                nc = portal.call(nats.connect, server.url)
                try:
                    yield Live(portal, c, nc, reference)
                finally:
                    portal.call(nc.close)
            finally:
                portal.call(c.close)
    finally:
        server.stop()


def forward(rid: str, rows: list[int], reply: str, dtype: str = "int32", meta: bool = True, pos: int = 0,
            route: tuple[str, str] = ("a", "b")) -> bytes:
    """A first stage's message for a new request ``rid`` whose tokens and errors go to ``reply``."""
    m = RequestMeta(reply=reply, chain=((0, 3), (3, 6)), route=route, prompt_ids=tuple(rows),
                    sampling=SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    item = ForwardItem(rid=rid, pos=pos, n=len(rows), meta=m if meta else None)
    data = np.asarray(rows, dtype={"int32": "<i4", "int64": "<i8", "float32": "<f4"}[dtype]).tobytes()
    return encode(Forward(items=(item,), dtype=dtype, shape=(len(rows),)), data)


def malformed_frames() -> dict[str, bytes]:
    head = b'{"kind":"fwd","items":[{"rid":"x","pos":0,"n":1}],"dtype":"int32","shape":[1]}'
    return {
        "empty": b"",
        "no magic": b"hello world, not a frame",
        "truncated length": MAGIC + b"\x00\x00",
        "truncated header": MAGIC + struct.pack(">I", len(head)) + head[:20],
        "oversized header length": MAGIC + struct.pack(">I", 0xFFFFFFFF) + head,
        "not json": MAGIC + struct.pack(">I", 5) + b"{{{{{",
        "unknown kind": MAGIC + struct.pack(">I", 15) + b'{"kind":"boom"}',
        "wrong dtype code": MAGIC + struct.pack(">I", len(head.replace(b"int32", b"int4"))) + head.replace(b"int32", b"int4") + b"\0" * 4,
        "shape/bytes mismatch": MAGIC + struct.pack(">I", len(head)) + head + b"\0" * 7,
        "negative position": MAGIC + struct.pack(">I", len(head.replace(b'"pos":0', b'"pos":-1'))) + head.replace(b'"pos":0', b'"pos":-1') + b"\0" * 4,
    }


def warnings_of(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------------- stages
@pytest.mark.parametrize("start", [0, 3])
def test_malformed_frames_to_a_stage(live: Live, caplog, start: int):
    subject = live.stage_subject(start)
    running = live.start_generate()
    for name, frame in malformed_frames().items():
        caplog.clear()
        live.publish(subject, frame)  # without a reply subject: logged, dropped
        error = live.request(subject, frame)  # answered after the one before (one subscription: in order)
        assert error.message.startswith("malformed message:") and error.node == live.node_id(start), name
        assert len(warnings_of(caplog, "parallax.stages.worker")) == 2, name
    assert running.result(60) == live.reference
    assert live.generate() == live.reference
    assert live.settled()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(frame=st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda b: MAGIC + b)),
       start=st.sampled_from([0, 3]))
def test_random_bytes_to_a_stage(live: Live, frame: bytes, start: int):
    assert live.request(live.stage_subject(start), frame).message.startswith("malformed message:")


def test_wrong_tensors_for_the_stage(live: Live, caplog):
    """Well-formed frames a stage cannot take: it answers the request's reply subject and keeps serving."""
    inbox = f"_INBOX.hostile.{uuid.uuid4().hex}"
    sub, got = live.collect(inbox)
    route = (live.node_id(0), live.node_id(3))
    running = live.start_generate()
    live.publish(live.stage_subject(0), forward("int64", PROMPT, inbox, dtype="int64", route=route))
    live.publish(live.stage_subject(0), forward("float", PROMPT, inbox, dtype="float32", route=route))
    live.publish(live.stage_subject(3), forward("ids-to-3", PROMPT, inbox, route=route))  # ids, not hidden states
    live.publish(live.stage_subject(0), forward("wrong-route", PROMPT, inbox, route=("someone", "else")))
    live.publish(live.stage_subject(0), forward("vocab", [5, 100_000, 7], inbox, route=route))  # tiny vocab is 512
    live.publish(live.stage_subject(0), forward("negative", [5, -3, 7], inbox, route=route))
    assert running.result(60) == live.reference
    live.until(lambda: len(got) >= 6)
    assert live.settled()
    errors = {m.rid: m for m in got}
    assert set(errors) == {"int64", "float", "ids-to-3", "wrong-route", "vocab", "negative"}, got
    assert all(isinstance(m, ErrorMsg) and m.code == "bad_request" for m in errors.values()), got
    assert "token ids must be in 0..511, got -3..7" in errors["negative"].message
    live.portal.call(sub.unsubscribe)


def _chunks(payload: bytes, parts: int, msg_id: str) -> list[tuple[bytes, dict]]:
    size = -(-len(payload) // parts)
    return [(payload[i * size : (i + 1) * size], {ID: msg_id, PART: f"{i}/{parts}"}) for i in range(parts)]


def test_chunks_unknown_out_of_order_duplicated_and_replayed(live: Live, caplog):
    inbox = f"_INBOX.hostile.{uuid.uuid4().hex}"
    sub, got = live.collect(inbox)
    route = (live.node_id(0), live.node_id(3))
    subject = live.stage_subject(0)
    running = live.start_generate()
    # a chunk of a message whose first part never came
    caplog.clear()
    assert "out of order" in live.request(subject, b"x" * 10, {ID: "nope", PART: "2/3"}).message
    for bad in ("", "1", "a/b", "3/3", "-1/2", "0/0"):
        assert f"bad {PART} header" in live.request(subject, b"x", {ID: "nope", PART: bad}).message
    assert len(warnings_of(caplog, "parallax.stages.worker")) == 7
    # out of order, then duplicated: the message is dropped, the request never starts
    first, second, third = _chunks(forward("shuffled", PROMPT, inbox, route=route), 3, "m1")
    for data, headers in (second, first, third):
        live.publish(subject, data, headers)
    first, second, third = _chunks(forward("twice", PROMPT, inbox, route=route), 3, "m2")
    for data, headers in (first, first, second, third):
        live.publish(subject, data, headers)
    # in order: a whole request sent as chunks runs; replayed once it finished, it is ignored
    whole = _chunks(forward("chunked", PROMPT, inbox, route=route), 3, "m3")
    for data, headers in whole:
        live.publish(subject, data, headers)
    assert running.result(60) == live.reference
    live.until(lambda: any(t.finish for m in got if isinstance(m, Tokens) for t in m.items))
    assert live.settled()
    tokens = [t for m in got if isinstance(m, Tokens) for t in m.items]
    assert [t.token for t in tokens if t.rid == "chunked"] == live.reference[:4]
    assert {t.rid for t in tokens} == {"chunked"} and not [m for m in got if isinstance(m, ErrorMsg)], got
    count = len(got)
    for data, headers in whole:  # replayed: its id is released on every stage
        live.publish(subject, data, headers)
    assert live.generate() == live.reference and live.settled()
    assert len(got) == count, got[count:]
    live.portal.call(sub.unsubscribe)


def test_steps_for_released_and_unknown_requests(live: Live):
    """Rows of a request a stage released (or never had) are dropped: no reply, no KV."""
    inbox = f"_INBOX.hostile.{uuid.uuid4().hex}"
    sub, got = live.collect(inbox)
    route = (live.node_id(0), live.node_id(3))
    live.publish(live.stage_subject(0), forward("done", PROMPT, inbox, route=route))
    live.until(lambda: any(t.finish for m in got for t in m.items))
    assert live.settled()
    assert [t.token for m in got for t in m.items] == live.reference[:4]
    count = len(got)
    running = live.start_generate()
    step = forward("done", [7], inbox, meta=False, pos=len(PROMPT) + 4)
    live.publish(live.stage_subject(0), step)  # a step of a released request
    live.publish(live.stage_subject(0), forward("never-seen", [7], inbox, meta=False, pos=3))
    live.publish(live.stage_subject(0), forward("done", PROMPT, inbox, route=route))  # its first frame, replayed
    live.publish(live.stage_subject(0), encode(Release(rids=("never-seen", "other"))))
    assert running.result(60) == live.reference
    assert live.settled() and len(got) == count, got[count:]
    live.portal.call(sub.unsubscribe)


# ------------------------------------------------------------------------------------------ gateway
def test_hostile_frames_to_the_gateway(live: Live, caplog):
    subject = live.cluster.pipeline.subject
    running = live.start_generate()
    for name, frame in malformed_frames().items():
        caplog.clear()
        assert live.request(subject, frame).message.startswith("malformed message:"), name
        assert len(warnings_of(caplog, "parallax.gateway.nats_pipeline")) == 1, name
    caplog.clear()
    unexpected = [forward("fwd", PROMPT, subject), encode(Release(rids=("x",)))]
    for frame in unexpected:  # not a gateway's kind of message
        assert "takes tokens or error" in live.request(subject, frame).message
    assert len(warnings_of(caplog, "parallax.gateway.nats_pipeline")) == len(unexpected)
    for rid in ("unknown", "", uuid.uuid4().hex):  # tokens and errors for requests it does not have: dropped
        live.publish(subject, encode(Tokens(items=(TokenOut(rid=rid or "r", token=1, index=0, finish="stop"),))))
        live.publish(subject, encode(ErrorMsg(rid=rid or None, message="boom")))
    assert running.result(60) == live.reference
    assert live.generate() == live.reference


def test_replayed_tokens_of_a_finished_request_are_dropped(live: Live):
    """Every frame a finished request got, replayed to the gateway, reaches nobody; a request running
    meanwhile is undisturbed."""
    subject = live.cluster.pipeline.subject
    sub, got = live.collect(subject)  # a second listener: records what the gateway got
    assert live.generate() == live.reference
    live.portal.call(sub.unsubscribe)
    assert got and all(isinstance(m, Tokens) for m in got)
    running = live.start_generate()
    for message in got:
        live.publish(subject, encode(message))
    assert running.result(60) == live.reference


# -------------------------------------------------------------------------------------------- parser
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), msg_id=st.none() | st.text(max_size=8), part=st.text(max_size=8))
def test_the_parser_raises_only_wire_errors(data: bytes, msg_id: str | None, part: str):
    """Whatever bytes and chunk headers come in, the reassembler and decoder either give a message or
    raise WireError (which every receiver logs and answers)."""
    headers = None if msg_id is None else {ID: msg_id, PART: part}
    for payload in (data, MAGIC + struct.pack(">I", len(data)) + data):
        try:
            Reassembler().receive(payload, headers)
        except WireError:
            pass
