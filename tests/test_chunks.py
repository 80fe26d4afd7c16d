"""Chunking (broker/chunks.py) over real nats-servers with a small ``max_payload``: the split and the
join, bad chunk sequences (out of order, lost, too big, bad headers), and real stages whose messages
only fit in parts: a decode batch of many requests on a wide model, which ``fit_payload`` cannot cut."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import nats
import pytest
import torch
from nats.errors import MaxPayloadError

from parallax.broker import chunks, subjects
from parallax.broker.chunks import ID, PART, Reassembler
from parallax.broker.errors import WireError
from parallax.broker.wire import ErrorMsg, Forward, decode
from tests.cluster import TINY, cluster, reference_greedy
from tests.conftest import start_nats_server

SMALL = 8 * 1024  # server max_payload for the direct tests
LIMIT = chunks.chunk_limit(SMALL)  # the largest payload sent whole: 4 KiB
SUBJECT = "parallax.test.chunks"


class FakeClock:
    """Stands in for ``time.monotonic`` in broker/chunks.py: expiry without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(chunks, "time", SimpleNamespace(monotonic=fake))  # not time.monotonic: asyncio uses it
    return fake


@pytest.fixture
def small_server():
    server = start_nats_server(max_payload=SMALL)
    try:
        yield server
    finally:
        server.stop()


async def subscribed(nc, subject: str, cb) -> None:
    """Subscribe, returning once the server has the subscription. ``nc.flush()`` is no barrier here:
    nats-py writes its PING straight to the socket, ahead of a SUB still in the pending buffer. A
    probe that comes back is one: the server handles one connection's commands in order."""
    await nc.subscribe(subject, cb=cb)
    probe = nc.new_inbox()
    echo = await nc.subscribe(probe, max_msgs=1)
    await nc.publish(probe, b"")
    await echo.next_msg(timeout=10)


def part(msg_id: str, index: int, total: int) -> dict[str, str]:
    return {ID: msg_id, PART: f"{index}/{total}"}


# ------------------------------------------------------------------------------- Reassembler alone
@pytest.mark.parametrize("value", ["", "1", "a/b", "1/2/3", "2/2", "3/2", "-1/2", "0/0", "0/-1", "/", "1/"])
def test_bad_part_headers_raise(value: str) -> None:
    r = Reassembler()
    with pytest.raises(WireError, match="bad Px-Part header"):
        r.feed(b"x", {ID: "m", PART: value})
    assert r.pending == 0


def test_missing_part_header_raises() -> None:
    with pytest.raises(WireError, match="bad Px-Part header ''"):
        Reassembler().feed(b"x", {ID: "m"})


def test_whole_messages_pass_through_untouched() -> None:
    r = Reassembler()
    assert r.feed(b"abc", None) == b"abc"
    assert r.feed(b"abc", {}) == b"abc"
    assert r.feed(b"abc", {"Other": "1"}) == b"abc"
    assert r.feed(b"solo", part("m", 0, 1)) == b"solo"  # a message of one part
    assert r.pending == 0


def test_a_bad_part_forgets_its_message() -> None:
    r = Reassembler()
    assert r.feed(b"a", part("m", 0, 3)) is None
    with pytest.raises(WireError, match="bad Px-Part header"):
        r.feed(b"b", {ID: "m", PART: "one/3"})
    assert r.pending == 0
    with pytest.raises(WireError, match="out of order"):  # the rest of it is no use now
        r.feed(b"c", part("m", 2, 3))
    assert r.pending == 0


def test_parts_that_change_their_total_raise() -> None:
    r = Reassembler()
    assert r.feed(b"a", part("m", 0, 3)) is None
    with pytest.raises(WireError, match=r"chunk 1/2 of m arrived out of order \(expected 1/3\)"):
        r.feed(b"b", part("m", 1, 2))  # would have ended the message one part short
    assert r.pending == 0


def test_total_over_max_bytes_raises_and_is_forgotten() -> None:
    r = Reassembler(max_bytes=10)
    assert r.feed(b"12345", part("big", 0, 3)) is None
    assert r.feed(b"12345", part("big", 1, 3)) is None  # exactly max_bytes so far: fine
    with pytest.raises(WireError, match="larger than 10 bytes"):
        r.feed(b"1", part("big", 2, 3))
    assert r.pending == 0
    with pytest.raises(WireError, match="larger than 10 bytes"):  # one part alone too big
        r.feed(b"x" * 11, part("huge", 0, 2))
    assert r.pending == 0
    assert r.feed(b"0123456789", part("ok", 0, 1)) == b"0123456789"


def test_a_partial_message_expires_once_idle_for_max_age(clock: FakeClock) -> None:
    r = Reassembler(max_age_s=30)
    assert r.feed(b"a", part("lost", 0, 3)) is None
    clock.now += 20
    assert r.feed(b"b", part("lost", 1, 3)) is None  # a part came: idle time restarts
    clock.now += 20
    assert r.feed(b"small", None) == b"small"
    assert r.pending == 1  # 20 s idle: still waiting for its last part
    clock.now += 11
    assert r.feed(b"small", None) == b"small"  # any message, whole ones too, sweeps the old ones
    assert r.pending == 0
    with pytest.raises(WireError, match="out of order"):  # its last part, far too late
        r.feed(b"c", part("lost", 2, 3))
    assert r.pending == 0


# ------------------------------------------------------------------ over a real small nats-server
@dataclass
class Receiver:
    """A plain subscriber feeding a Reassembler: whole payloads and errors in arrival order, and
    every raw message's (size, headers)."""

    reassembler: Reassembler = field(default_factory=Reassembler)
    raw: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    out: asyncio.Queue = field(default_factory=asyncio.Queue)

    async def on_msg(self, msg) -> None:
        self.raw.append((len(msg.data), dict(msg.headers or {})))
        try:
            whole = self.reassembler.feed(msg.data, msg.headers)
        except WireError as e:
            self.out.put_nowait(e)
            return
        if whole is not None:
            self.out.put_nowait(whole)

    async def next(self) -> bytes | WireError:
        return await asyncio.wait_for(self.out.get(), 10)

    async def raw_count(self, n: int) -> None:
        """Wait until ``n`` raw messages came (parts that complete nothing put nothing in ``out``)."""
        for _ in range(1000):
            if len(self.raw) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(self.raw)} of {n} raw messages came")


@contextlib.asynccontextmanager
async def receiving(url: str, reassembler: Reassembler | None = None):
    """(publisher connection, receiver) on one small server, the subscription live."""
    pub, sub = await nats.connect(url), await nats.connect(url)
    receiver = Receiver(reassembler or Reassembler())
    try:
        await subscribed(sub, SUBJECT, receiver.on_msg)
        yield pub, receiver
    finally:
        await pub.close()
        await sub.close()


async def test_the_small_server_really_refuses_a_message_over_its_limit(small_server):
    async with receiving(small_server.url) as (pub, _):
        assert pub.max_payload == SMALL and LIMIT == SMALL - chunks.HEADER_ROOM
        with pytest.raises(MaxPayloadError):
            await pub.publish(SUBJECT, b"x" * (SMALL + 1))


@pytest.mark.parametrize("size", [1, LIMIT, LIMIT + 1, 2 * LIMIT, 37 * LIMIT + 123, 1 << 20],
                         ids=["1", "limit", "limit+1", "2-parts", "38-parts", "1MiB"])
async def test_publish_splits_above_the_limit_and_joins_byte_identical(small_server, size):
    payload = os.urandom(size)
    async with receiving(small_server.url) as (pub, receiver):
        await chunks.publish(pub, SUBJECT, payload)
        assert await receiver.next() == payload
        await pub.flush()
        assert pub.is_connected  # every part and its headers fit: the server did not cut us off
    parts = math.ceil(size / LIMIT)
    assert len(receiver.raw) == parts
    assert all(n <= LIMIT for n, _ in receiver.raw)
    if parts == 1:
        assert ID not in receiver.raw[0][1]  # a message that fits goes whole, without headers
    else:
        assert len({h[ID] for _, h in receiver.raw}) == 1
        assert [h[PART] for _, h in receiver.raw] == [f"{i}/{parts}" for i in range(parts)]
    assert receiver.reassembler.pending == 0


async def test_interleaved_chunked_messages_from_two_publishers(small_server):
    payloads = [os.urandom(20 * LIMIT + 5), os.urandom(17 * LIMIT + 9)]
    async with receiving(small_server.url) as (pub, receiver):
        other = await nats.connect(small_server.url)
        try:
            await asyncio.gather(*(chunks.publish(nc, SUBJECT, p) for nc, p in zip([pub, other], payloads)))
            got = {await receiver.next(), await receiver.next()}
        finally:
            await other.close()
    assert got == set(payloads)
    assert receiver.reassembler.pending == 0


async def test_out_of_order_parts_raise_and_leave_nothing_behind(small_server):
    async with receiving(small_server.url) as (pub, receiver):
        await pub.publish(SUBJECT, b"b", headers=part("first-lost", 1, 3))
        await pub.publish(SUBJECT, b"a", headers=part("gap", 0, 3))
        await pub.publish(SUBJECT, b"c", headers=part("gap", 2, 3))  # part 1 never came
        await pub.publish(SUBJECT, b"a", headers=part("twice", 0, 2))
        await pub.publish(SUBJECT, b"a", headers=part("twice", 0, 2))
        for name in ["first-lost", "gap", "twice"]:
            error = await receiver.next()
            assert isinstance(error, WireError) and f"of {name} arrived out of order" in str(error)
        assert receiver.reassembler.pending == 0
        good = os.urandom(3 * LIMIT)
        await chunks.publish(pub, SUBJECT, good)
        assert await receiver.next() == good
    assert receiver.reassembler.pending == 0


async def test_a_message_with_a_lost_last_part_expires_and_others_pass(small_server, clock):
    reassembler = Reassembler(max_age_s=30)
    async with receiving(small_server.url, reassembler) as (pub, receiver):
        await pub.publish(SUBJECT, b"a" * LIMIT, headers=part("lost", 0, 3))
        await pub.publish(SUBJECT, b"b" * LIMIT, headers=part("lost", 1, 3))  # part 2 is lost
        await receiver.raw_count(2)
        assert reassembler.pending == 1
        later = os.urandom(5 * LIMIT)
        await chunks.publish(pub, SUBJECT, later)
        assert await receiver.next() == later  # unaffected by the half message
        assert reassembler.pending == 1
        clock.now += 31
        await chunks.publish(pub, SUBJECT, b"tiny")
        assert await receiver.next() == b"tiny"
        assert reassembler.pending == 0  # the half message is gone, not kept forever
        await chunks.publish(pub, SUBJECT, later)
        assert await receiver.next() == later


async def test_a_message_over_max_bytes_raises_and_the_next_passes(small_server):
    reassembler = Reassembler(max_bytes=2 * LIMIT)
    async with receiving(small_server.url, reassembler) as (pub, receiver):
        await chunks.publish(pub, SUBJECT, os.urandom(2 * LIMIT + 1))
        error = await receiver.next()
        assert isinstance(error, WireError) and f"larger than {2 * LIMIT} bytes" in str(error)
        assert reassembler.pending == 0
        fits = os.urandom(2 * LIMIT)
        await chunks.publish(pub, SUBJECT, fits)
        assert await receiver.next() == fits
    assert reassembler.pending == 0


# -------------------------------------------------------------------------------- real stages
WIDE = 1024  # hidden size: a float32 row is 4 KiB, like a bf16 row of a 2048-wide model
E2E_PAYLOAD = 24 * 1024  # server max_payload: 5 rows of hidden states fit in one message
REQUESTS = 32
NEW_TOKENS = 6
PROMPTS = [[(i * 37 + j * 11) % 500 + 1 for j in range(3 + i % 5)] for i in range(REQUESTS)]
BOUND_S = 120  # a broken join loses the request, which would wait out the gateway's 600 s first-token timeout


async def generate_all(c, prompts: list[list[int]]) -> list[list[int]]:
    batch = asyncio.gather(*(c.generate(p, max_tokens=NEW_TOKENS, ignore_eos=True) for p in prompts))
    return list(await asyncio.wait_for(batch, BOUND_S))


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A 2-layer random Llama of hidden size WIDE (same shape rules as tests/cluster.py's tiny)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", num_hidden_layers=2, vocab_size=512, tie_word_embeddings=False,
                                  **{**TINY, "hidden_size": WIDE})
    path = tmp_path_factory.mktemp("wide") / "llama"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def references(wide) -> list[list[int]]:
    return [reference_greedy(wide, p, NEW_TOKENS) for p in PROMPTS]


@pytest.fixture
def e2e_server():
    server = start_nats_server(max_payload=E2E_PAYLOAD)
    try:
        yield server
    finally:
        server.stop()


class Tap:
    """A raw subscriber on ``parallax.>``: joins the chunked messages and keeps their headers."""

    def __init__(self) -> None:
        self.reassembler = Reassembler()
        self.parts = 0
        self.chunked: list[tuple[str, object]] = []  # (subject, decoded header) per chunked message
        self.errors: list[str] = []

    async def on_msg(self, msg) -> None:
        if not msg.headers or ID not in msg.headers:
            return
        self.parts += 1
        try:
            whole = self.reassembler.feed(msg.data, msg.headers)
            if whole is not None:
                self.chunked.append((msg.subject, decode(whole)[0]))
        except WireError as e:
            self.errors.append(str(e))

    def decode_batches(self) -> list[Forward]:
        """Chunked hidden-state messages of decode rows only (one row per request)."""
        return [h for _, h in self.chunked if isinstance(h, Forward) and h.dtype == "float32"
                and all(item.n == 1 for item in h.items)]


@contextlib.asynccontextmanager
async def tapped(url: str):
    nc = await nats.connect(url)
    tap = Tap()
    try:
        await subscribed(nc, f"{subjects.PREFIX}.>", tap.on_msg)
        yield tap
    finally:
        await nc.close()


def test_wide_references_are_not_degenerate(references):
    assert len({tuple(r) for r in references}) > REQUESTS // 2
    assert all(len(set(r)) > 1 for r in references)


async def test_decode_batches_over_max_payload_flow_in_chunks_and_stay_exact(e2e_server, wide, references):
    async with tapped(e2e_server.url) as tap, cluster(e2e_server.url, wide, "wide", 2, [(0, 1), (1, 2)]) as c:
        got = await generate_all(c, PROMPTS)
        assert await c.settled()
        workers = [w for _, _, w in c.stages.values()]
        assert all(w.nc.max_payload == E2E_PAYLOAD and w.nc.is_connected for w in workers)
        assert all(w._reassembler.pending == 0 for w in workers)
    assert got == references
    rows_per_message = chunks.chunk_limit(E2E_PAYLOAD) // (WIDE * 4)
    batches = tap.decode_batches()
    assert batches, f"no decode batch was chunked; chunked messages: {[(s, type(h).__name__) for s, h in tap.chunked]}"
    assert max(b.shape[0] for b in batches) > rows_per_message
    assert all(b.shape[1:] == (WIDE,) for b in batches)
    assert tap.parts > len(tap.chunked) and not tap.errors


async def test_a_stage_and_a_gateway_survive_malformed_chunk_sequences(e2e_server, wide, references, caplog):
    async with cluster(e2e_server.url, wide, "wide", 2, [(0, 1), (1, 2)]) as c:
        nc = c.nc
        targets = [subjects.node("wide", w.spec.start, w.spec.end, node) for node, (_, _, w) in c.stages.items()]
        inbox = nc.new_inbox()
        replies = await nc.subscribe(inbox)
        cases = [
            ([(b"x", part("late", 1, 2))], "of late arrived out of order"),
            ([(b"x", part("twice", 0, 2)), (b"x", part("twice", 0, 2))], "of twice arrived out of order"),
            ([(b"x", {ID: "bad", PART: "x/y"})], "bad Px-Part header"),
            ([(b"x" * 100, part("junk", 0, 2)), (b"y" * 100, part("junk", 1, 2))], "malformed message"),  # joined: not a message
        ]
        for subject in targets:
            for parts, expected in cases:
                for data, headers in parts:
                    await nc.publish(subject, data, reply=inbox, headers=headers)
                error, _ = decode((await replies.next_msg(timeout=10)).data)
                assert isinstance(error, ErrorMsg) and "malformed message" in error.message and expected in error.message
        await nc.publish(targets[0], b"x", headers=part("half", 0, 2))  # its last part is lost
        await nc.publish(c.pipeline.subject, b"x", headers=part("reply", 1, 2))  # the gateway drops it
        await nc.flush()
        assert all(not task.done() for _, task, _ in c.stages.values())
        assert await generate_all(c, PROMPTS[:1]) == references[:1]
        assert await generate_all(c, PROMPTS[:12]) == references[:12]
    assert "dropped malformed message" in caplog.text and "dropped malformed reply" in caplog.text
