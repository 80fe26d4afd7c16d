"""CasBucket (broker/kv.py) against a real nats-server: create on a never-written, a deleted and an
expired key; compare-and-set with a stale revision fails; TTLs expire; the lock is exclusive. The
bucket's listing (``snapshot``) holds every live key while others are rewritten."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.js import errors as js_errors

from parallax.broker.kv import CasBucket, live_keys, nodes_bucket, snapshot, watch_nodes
from parallax.broker.registry import NodeInfo, Registry
from parallax.broker.tasks import stop_task


@pytest.fixture
async def bucket(nats_url):
    nc = await nats.connect(nats_url)
    try:
        yield CasBucket(await nodes_bucket(nc))
    finally:
        await nc.close()


async def value(bucket: CasBucket, key: str) -> bytes | None:
    """The key's value, None when it has none (never written, deleted, expired)."""
    try:
        return (await bucket.kv.get(key)).value or None
    except js_errors.KeyNotFoundError:
        return None


async def until_gone(bucket: CasBucket, key: str, timeout: float = 10.0) -> None:
    """Wait for ``key``'s TTL to expire (the server's expiry timer is not exact to the second)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await value(bucket, key) is not None:
        assert loop.time() < deadline, f"{key} did not expire within {timeout} s"
        await asyncio.sleep(0.1)


async def test_create_on_a_never_written_key(bucket):
    rev = await bucket.create("assign.a", b"one")
    assert rev > 0 and await value(bucket, "assign.a") == b"one"
    with pytest.raises(js_errors.KeyWrongLastSequenceError):  # it has a value now
        await bucket.create("assign.a", b"two")
    assert await value(bucket, "assign.a") == b"one"


async def test_create_on_a_deleted_key(bucket):
    """The report's bug: after a delete, ``update(last=0)`` is refused forever; create is not."""
    rev = await bucket.create("assign.a", b"one")
    assert await bucket.delete("assign.a", rev)
    with pytest.raises(js_errors.KeyWrongLastSequenceError):
        await bucket.kv.update("assign.a", b"two", last=0)
    assert await bucket.write("assign.a", b"two", 0) > rev
    assert await value(bucket, "assign.a") == b"two"


async def test_create_on_an_expired_key_while_its_marker_lives(bucket):
    """An expired TTL leaves a marker (1 s, ``limit_marker_ttl``) that nats-py's create does not
    recognise; CasBucket.create writes over it, with the marker there and after it aged out."""
    await bucket.create("leader", b"a", ttl_s=1)
    await until_gone(bucket, "leader")
    try:
        marker = (await bucket.kv.get("leader")).value  # the expiry marker: an entry without a value
    except js_errors.KeyNotFoundError:
        marker = None  # it aged out already (a slow machine): then this is the never-written case
    assert marker is None
    rev = await bucket.create("leader", b"b", ttl_s=1)
    assert await value(bucket, "leader") == b"b"
    await until_gone(bucket, "leader")
    await asyncio.sleep(1.5)  # the marker itself expires: the key was never written, as far as the server knows
    assert await bucket.create("leader", b"c") > rev
    assert await value(bucket, "leader") == b"c"


async def test_update_with_a_stale_revision_fails(bucket):
    first = await bucket.write("assign.a", b"one", 0)
    second = await bucket.write("assign.a", b"two", first)
    assert second > first
    for ttl_s in (None, 5):  # both paths: KeyValue.update, and the TTL publish
        with pytest.raises(js_errors.KeyWrongLastSequenceError):
            await bucket.write("assign.a", b"three", first, ttl_s)
    assert not await bucket.delete("assign.a", first)
    assert await value(bucket, "assign.a") == b"two"
    assert await bucket.delete("assign.a", second)
    assert await value(bucket, "assign.a") is None
    with pytest.raises(ValueError):
        await bucket.delete("assign.a", 0)


async def test_ttl_expiry(bucket):
    await bucket.put("stage.a", b"alive", ttl_s=1)
    rev = await bucket.write("leader", b"a", 0, ttl_s=1)
    rev = await bucket.write("leader", b"a", rev, ttl_s=1)  # a refresh keeps a TTL
    await bucket.write("assign.a", b"no ttl", 0)
    await until_gone(bucket, "stage.a")
    await until_gone(bucket, "leader")
    assert await value(bucket, "assign.a") == b"no ttl"
    with pytest.raises(js_errors.KeyWrongLastSequenceError):  # the holder's revision is stale after the expiry
        await bucket.write("leader", b"a", rev, ttl_s=1)


async def test_lock_is_exclusive_refreshed_and_taken_over_after_expiry(bucket):
    a = await bucket.lock("leader", b"a", 0, ttl_s=1)
    assert a is not None
    assert await bucket.lock("leader", b"b", 0, ttl_s=1) is None
    a = await bucket.lock("leader", b"a", a, ttl_s=1)  # refreshed by compare-and-set
    assert a is not None and await value(bucket, "leader") == b"a"
    await until_gone(bucket, "leader")
    b = await bucket.lock("leader", b"b", 0, ttl_s=1)
    assert b is not None and await value(bucket, "leader") == b"b"
    assert await bucket.lock("leader", b"a", a, ttl_s=1) is None  # a's revision is stale now
    assert await bucket.delete("leader", b)
    assert await bucket.lock("leader", b"a", 0, ttl_s=1) is not None  # free again after a resignation


async def rewriting(kv, live: dict[str, bytes]):
    """``live`` put, and a task that puts every key again, one every 5 ms (heartbeats, faster)."""
    for key, value in live.items():
        await kv.put(key, value)

    async def rewrite():
        while True:
            for key, value in live.items():
                await kv.put(key, value)
                await asyncio.sleep(0.005)
    return asyncio.create_task(rewrite())


async def test_a_listing_holds_every_live_key_while_keys_are_rewritten(bucket):
    """``snapshot`` lists what is in the bucket at one instant, heartbeats or not: nats-py's ``kv.keys()``
    ended about one listing in ten early here while a writer rewrote the keys every 5 ms."""
    kv = bucket.kv
    live = {f"stage.n{i}": f"v{i}".encode() for i in range(3)} | {"assign.n0": b"0:2"}
    await kv.put("stage.gone", b"x")
    await kv.delete("stage.gone")
    await bucket.create("stage.expired", b"x", ttl_s=1)
    await until_gone(bucket, "stage.expired")
    writer = await rewriting(kv, live)
    try:
        for _ in range(200):
            assert await snapshot(kv) == live
        assert await snapshot(kv, "assign.>") == {"assign.n0": b"0:2"}
        listed = set(await live_keys(kv, "stage.>"))  # a delete marker too (get tells it apart); an expiry
        assert listed - {"stage.expired"} == {"stage.gone", "stage.n0", "stage.n1", "stage.n2"}  # marker until it ages out
    finally:
        await stop_task(writer)


async def test_a_watched_registry_is_complete_when_ready_while_keys_are_rewritten(bucket):
    """``watch_nodes`` sets ``ready`` only once every node in the bucket is in the registry (the gateway
    routes and the scheduler plans from it at once), then follows changes."""
    nodes = [NodeInfo(node_id=f"n{i}", model="m", start=i, end=i + 1, num_layers=3) for i in range(3)]
    writer = await rewriting(bucket.kv, {n.key: n.model_dump_json().encode() for n in nodes})
    try:
        for _ in range(50):
            registry, ready = Registry(), asyncio.Event()
            watch = asyncio.create_task(watch_nodes(bucket.kv, registry, ready=ready))
            await asyncio.wait_for(ready.wait(), 10)
            assert sorted(n.node_id for n in registry.nodes("m")) == ["n0", "n1", "n2"]
            await stop_task(watch)
    finally:
        await stop_task(writer)
    registry = Registry()
    watch = asyncio.create_task(watch_nodes(bucket.kv, registry))
    try:
        await bucket.kv.put("stage.n3", nodes[0].model_copy(update={"node_id": "n3"}).model_dump_json().encode())
        await bucket.kv.delete("stage.n0")
        await until(lambda: {n.node_id for n in registry.nodes("m")} == {"n1", "n2", "n3"})
        await bucket.kv.delete("stage.n3")
        await until(lambda: {n.node_id for n in registry.nodes("m")} == {"n1", "n2"})
    finally:
        await stop_task(watch)


async def until(check, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "the registry did not follow the bucket"
        await asyncio.sleep(0.05)
