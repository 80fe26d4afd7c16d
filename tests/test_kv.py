"""CasBucket (broker/kv.py) against a real nats-server: create on a never-written, a deleted and an
expired key; compare-and-set with a stale revision fails; TTLs expire; the lock is exclusive."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.js import errors as js_errors

from parallax.broker.kv import CasBucket, nodes_bucket


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
