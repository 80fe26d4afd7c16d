"""The cluster registry in JetStream KV: bucket ``parallax-nodes``.

    stage.<node_id>       NodeInfo JSON of a stage (rewritten every heartbeat, per-key TTL)
    gateway.<node_id>     NodeInfo JSON of a gateway
    scheduler.<node_id>   NodeInfo JSON of a scheduler
    assign.<node_id>      Assignment JSON: the layer range the leading scheduler gave that stage
    leader                the leading scheduler's id (a lock: created with a TTL, refreshed by CAS)

A node key carries a TTL of ``KEY_TTL_S`` seconds, so a node that stops heartbeating disappears
on its own (watchers get a PURGE marker, the bucket has ``limit_marker_ttl``); a clean exit deletes
it at once. :class:`CasBucket` holds every conditional or TTL write (the lock, the assignments, the
heartbeats). ``nats kv ls parallax-nodes`` / ``nats kv get parallax-nodes stage.<id>`` read it all.

Seen from a leaf-node site, the bucket lives in another JetStream domain (``--js-domain hub``):
:class:`DomainJetStream` is the one place that makes KV writes reach it. The bucket has 3 replicas
when the domain is a cluster of 3+ servers (:func:`create_nodes_bucket`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.js import errors as js_errors
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue
from pydantic import ValidationError

from .errors import NoJetStream
from .registry import KEY_TTL_S, NodeInfo, Registry
from .tasks import stop_task

log = logging.getLogger(__name__)
NODES_BUCKET = "parallax-nodes"
KINDS = ("stage", "gateway", "scheduler")
DELETED = ("DEL", "PURGE")


async def nodes_bucket(nc: NATS, domain: str | None = None, timeout_s: float = 5.0) -> KeyValue:
    """The ``parallax-nodes`` bucket in JetStream domain ``domain`` (None: the server's own), created on
    first use (several nodes may race to create it) with :func:`create_nodes_bucket`."""
    js = nc.jetstream(timeout=timeout_s) if domain is None else DomainJetStream(nc, domain, timeout_s)
    try:
        return await js.key_value(NODES_BUCKET)
    except js_errors.BucketNotFoundError:
        pass
    except (js_errors.ServiceUnavailableError, js_errors.NoStreamResponseError, asyncio.TimeoutError) as e:
        where = "the NATS server has no JetStream" if domain is None else f"no JetStream answers for domain {domain!r}"
        raise NoJetStream(f"{where} ({type(e).__name__}); start it with `nats-server -js`") from e
    try:
        return await create_nodes_bucket(js)
    except js_errors.BadRequestError:  # created by another node in between
        return await js.key_value(NODES_BUCKET)


CANNOT_REPLICATE = (10074, 10005)  # "replicas > 1 not supported in non-clustered mode", "no suitable peers"
REPLICAS = 3


async def create_nodes_bucket(js: JetStreamContext) -> KeyValue:
    """The one rule for the registry's replicas: ``REPLICAS`` (3) where the domain's JetStream can place
    them (a cluster of 3 or more servers, all up), else 1 (one server; the server says which)."""
    config = KeyValueConfig(bucket=NODES_BUCKET, history=1, limit_marker_ttl=1, replicas=REPLICAS,
                            description="Parallax-NATS nodes, layer assignments and the scheduler lock")
    try:
        return await js.create_key_value(config)
    except js_errors.APIError as e:
        if e.err_code not in CANNOT_REPLICATE:
            raise
        if e.err_code == 10005:  # a cluster, but not 3 servers up now
            log.warning("the registry bucket gets 1 replica: JetStream cannot place %d (%s)", REPLICAS, e.description)
        return await js.create_key_value(config, replicas=1)


class DomainJetStream(JetStreamContext):
    """JetStream of another domain (a hub seen from a leaf-node site), with KV writes that arrive.

    nats-py 2.16's KeyValue publishes every write (put, create, update, delete, purge, our TTL writes)
    to ``$KV.<bucket>.<key>`` whatever the domain; from a leaf site that subject never reaches the other
    domain's stream (``NoStreamResponseError``). Published under the domain's API prefix,
    ``$JS.<domain>.API.$KV.<bucket>.<key>``, it does (the server maps it back), on either side of the
    link. Reads and watches already go through the prefix. A client that adds the prefix itself (the
    upstream fix) publishes no ``$KV.`` subject here, so nothing is prefixed twice."""

    def __init__(self, nc: NATS, domain: str, timeout_s: float):
        super().__init__(nc, domain=domain, timeout=timeout_s)
        self.kv_write_prefix = f"$JS.{domain}.API."

    async def publish(self, subject: str, *args, **kwargs) -> api.PubAck:
        if subject.startswith("$KV."):
            subject = self.kv_write_prefix + subject
        return await super().publish(subject, *args, **kwargs)


def parse_node(value: bytes | None) -> NodeInfo | None:
    if not value:
        return None
    try:
        return NodeInfo.model_validate_json(value)
    except ValidationError as e:
        log.warning("ignored a bad node entry: %s", " ".join(str(e).split())[:200])
        return None


async def watch_nodes(kv: KeyValue, registry: Registry, on_change: Callable[[], Awaitable[None] | None] | None = None,
                      ready: asyncio.Event | None = None) -> None:
    """Keep ``registry`` equal to the bucket's node keys until cancelled. ``ready`` is set once the keys
    present at the start are in (read with :func:`snapshot` after the watch began, so no change falls
    between: the watch's own end-of-initial-values marker can come before some of them, see
    :func:`live_keys`); ``on_change`` runs after every change the watch brings after that."""
    watcher = await kv.watch(">")
    try:
        for key, value in (await snapshot(kv)).items():
            _apply(registry, key, value)
        if ready is not None:
            ready.set()
        async for entry in watcher:
            if entry is None:  # the end of the initial values (they repeat the snapshot, or are newer)
                continue
            if not _apply(registry, entry.key, None if entry.operation in DELETED else entry.value):
                continue  # an assignment, the lock: not a node
            if on_change is not None:
                result = on_change()
                if asyncio.iscoroutine(result):
                    await result
    finally:
        await watcher.stop()


def _apply(registry: Registry, key: str, value: bytes | None) -> bool:
    """One key's value (None: deleted or expired) into the registry; False for a key that is not a node's."""
    if key.split(".", 1)[0] not in KINDS:
        return False
    if value is None:
        registry.remove(key)
        return True
    info = parse_node(value)
    if info is not None and info.key == key:
        registry.update(info)
    return True


async def live_keys(kv: KeyValue, pattern: str = ">") -> list[str]:
    """The bucket's keys matching ``pattern`` (``>``, ``assign.>``) that hold a message now: a value, or a
    delete or expiry marker (``kv.get`` tells them apart), from the stream's subject list at one instant.

    Not nats-py's ``kv.keys()``: its listing ends at the first message whose ``num_pending`` is 0, and while
    other keys are being rewritten (every heartbeat) that comes early; measured here, about one listing in
    ten lacked a live key (tests/test_kv.py; upstream: nats.py issue #842, PR #995, open). The server caps one
    answer at 100,000 subjects."""
    info = await kv._js.stream_info(kv._stream, subjects_filter=f"{kv._pre}{pattern}")
    subjects = info.state.subjects or {}
    return [subject[len(kv._pre):] for subject in subjects]


async def entries(kv: KeyValue, pattern: str = ">") -> dict[str, KeyValue.Entry]:
    """Every key matching ``pattern`` that has a value, and its entry (value and revision)."""
    found: dict[str, KeyValue.Entry] = {}
    for key in await live_keys(kv, pattern):
        try:
            entry = await kv.get(key)
        except js_errors.KeyNotFoundError:  # deleted (a marker), or gone in between
            continue
        if entry.value:
            found[key] = entry
    return found


async def snapshot(kv: KeyValue, pattern: str = ">") -> dict[str, bytes]:
    """Every key matching ``pattern`` that has a value, and the value (``parallax status``)."""
    return {key: entry.value for key, entry in (await entries(kv, pattern)).items()}


WRONG_LAST = (10071, 10164)  # JetStream's "wrong last sequence" error codes (the ones KeyValue.update maps)


class CasBucket:
    """Compare-and-set writes on a KV bucket, optionally with a per-key TTL (whole seconds), and
    the lock built on them (the ``leader`` key).

    A write names the revision it expects the key to have: 0 when the key has no value now (never
    written, deleted, or expired), else the revision read. A write that lost the race raises
    ``KeyWrongLastSequenceError``. Values are never empty (an expiry marker reads as one).
    """

    def __init__(self, kv: KeyValue):
        self.kv = kv

    async def write(self, key: str, value: bytes, last: int, ttl_s: int | None = None) -> int:
        """Write ``key`` if its revision is still ``last`` (0: it has no value); the new revision."""
        if last == 0:
            return await self.create(key, value, ttl_s)
        if ttl_s is None:
            return await self.kv.update(key, value, last=last)
        return await self._publish_ttl(key, value, ttl_s, last)

    async def create(self, key: str, value: bytes, ttl_s: int | None = None) -> int:
        """Write ``key`` if it has no value: never written, deleted (``KeyValue.create`` writes over
        the delete marker) or expired."""
        try:
            return await self.kv.create(key, value, msg_ttl=ttl_s)
        except js_errors.KeyWrongLastSequenceError:
            # nats-py 2.16's create knows delete markers (KV-Operation DEL/PURGE) but not the marker
            # the server leaves for ``limit_marker_ttl`` when a TTL expires (Nats-Marker-Reason, no
            # KV-Operation): kv.get returns that one as an entry without a value.
            try:
                marker = await self.kv.get(key)
            except js_errors.KeyNotFoundError:  # deleted or the marker aged out in between
                return await self.kv.create(key, value, msg_ttl=ttl_s)
            if marker.value:
                raise
            return await self.write(key, value, marker.revision, ttl_s)

    async def put(self, key: str, value: bytes, ttl_s: int) -> int:
        """Write ``key`` whatever it holds, to expire ``ttl_s`` seconds later (a heartbeat)."""
        return await self._publish_ttl(key, value, ttl_s)

    async def delete(self, key: str, last: int) -> bool:
        """Delete ``key`` if its revision is still ``last``; False when it changed in between."""
        if last < 1:  # KeyValue.delete would delete whatever the key holds
            raise ValueError(f"delete {key}: need the revision read, got {last}")
        try:
            await self.kv.delete(key, last=last)
        except js_errors.APIError as e:  # KeyValue.delete does not map the wrong-last-sequence error
            if e.err_code in WRONG_LAST:
                return False
            raise
        return True

    async def lock(self, key: str, owner: bytes, held: int, ttl_s: int) -> int | None:
        """Take the lock ``key`` (``held`` 0) or refresh ours (``held``: the revision we wrote), to
        expire ``ttl_s`` seconds after this write; the new revision, or None if another holds it."""
        try:
            return await self.write(key, owner, held, ttl_s)
        except js_errors.KeyWrongLastSequenceError:
            return None

    async def _publish_ttl(self, key: str, value: bytes, ttl_s: int, last: int | None = None) -> int:
        # The one use of nats-py's private KV API: 2.16 has no TTL on KeyValue.put or
        # KeyValue.update (only create takes msg_ttl), so publish to the key's subject like they do.
        headers = None if last is None else {api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(last)}
        try:
            ack = await self.kv._js.publish(f"{self.kv._pre}{key}", value, headers=headers, msg_ttl=ttl_s)
        except js_errors.APIError as e:
            if e.err_code in WRONG_LAST:
                raise js_errors.KeyWrongLastSequenceError(description=e.description) from e
            raise
        return ack.seq


class Presence:
    """Keeps one node's key alive: written now, every ``every_s`` and on :meth:`beat`, with a TTL;
    deleted on exit (a crash leaves it to expire)."""

    def __init__(self, kv: KeyValue, describe: Callable[[], NodeInfo], every_s: float):
        self.kv, self.describe, self.every_s = kv, describe, every_s
        self._bucket = CasBucket(kv)
        self._task: asyncio.Task | None = None
        self._key: str | None = None

    async def __aenter__(self) -> "Presence":
        await self.beat()
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            await stop_task(self._task)
        if self._key is not None:
            try:
                await self.kv.delete(self._key)
            except Exception as e:  # the server may be gone already; the TTL cleans up
                log.debug("could not delete %s: %s", self._key, e)

    async def beat(self) -> None:
        info = self.describe()
        self._key = info.key
        await self._bucket.put(info.key, info.model_dump_json().encode(), KEY_TTL_S)

    async def _loop(self) -> None:
        clock = asyncio.get_running_loop().time
        due = clock()
        while True:
            due = max(due + self.every_s, clock())  # a steady beat: the time a write takes does not add up
            await asyncio.sleep(due - clock())
            try:
                await self.beat()
            except Exception as e:  # a reconnect in progress: try again next beat
                log.warning("heartbeat to the registry failed: %s: %s", type(e).__name__, e)
