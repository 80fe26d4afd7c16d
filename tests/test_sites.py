"""How processes connect (NatsOptions and the shared flags, TLS and nkeys against a real server), and
the sites of issue 13: a hub and a leaf-node site with their own JetStream domains, and a 3-server
cluster with a replicated registry."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import logging
import uuid
from pathlib import Path

import pytest
from nats.js import errors as js_errors

from parallax.broker.cli import add_nats_args, nats_options
from parallax.broker.connection import DEFAULT_URL, NatsOptions, connect
from parallax.broker.errors import NatsUnreachable, UsageError
from parallax.broker.kv import NODES_BUCKET, CasBucket, nodes_bucket
from parallax.broker.registry import LEADER_KEY
from parallax.broker.server import EmbeddedServer, free_port
from parallax.broker.tasks import stop_task
from parallax.broker.wire import SamplingParams
from parallax.gateway.nats_pipeline import NatsPipeline, PipelineConfig
from parallax.scheduler.service import Scheduler, SchedulerConfig
from parallax.stages.engine import EngineConfig
from parallax.stages.torch_backend import TorchBackend
from parallax.stages.worker import StageWorker, WorkerConfig
from parallax.status import fetch_snapshot

from .cluster import make_tiny_model, reference_greedy
from .conftest import start_nats_server

log = logging.getLogger(__name__)
LAYERS, PROMPT, NEW_TOKENS = 4, [5, 9, 33, 101, 7], 24


# --- credentials made for the tests --------------------------------------------------------------
def write_tls(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name: str, issuer_name: x509.Name | None, issuer_key, ca: bool, usage=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
        return key, builder.sign(issuer_key or key, hashes.SHA256())

    ca_key, ca = issue("parallax test CA", None, None, ca=True)
    files = {"ca": ca}
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key, files[role] = issue(role, ca.subject, ca_key, ca=False, usage=usage)
        (folder / f"{role}-key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    paths = {}
    for name, cert in files.items():
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return {**paths, "server_key": folder / "server-key.pem", "client_key": folder / "client-key.pem"}


def write_nkey(folder: Path) -> tuple[Path, str]:
    """A user nkey seed file and its public key."""
    import os

    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path = folder / "user.nk"
    path.write_bytes(seed + b"\n")
    return path, nkeys.from_seed(bytearray(seed)).public_key.decode()


# --- NatsOptions and the flags -------------------------------------------------------------------
def parse(*argv: str) -> NatsOptions:
    parser = argparse.ArgumentParser()
    add_nats_args(parser)
    return nats_options(parser.parse_args(argv))


def test_flags_build_the_options_and_children_get_them_back(tmp_path):
    tls = write_tls(tmp_path)
    seed, _ = write_nkey(tmp_path)
    assert parse() == NatsOptions() and NatsOptions().servers == (DEFAULT_URL,)
    options = parse("--nats", "nats://a:4222, tls://b:4223,nats://c", "--nkey", str(seed), "--tls-ca", str(tls["ca"]),
                    "--tls-cert", str(tls["client"]), "--tls-key", str(tls["client_key"]), "--js-domain", "hub")
    assert options.servers == ("nats://a:4222", "tls://b:4223", "nats://c") and options.js_domain == "hub"
    assert parse(*options.cli_args()) == options  # what `parallax up` hands its children
    kwargs = options.connect_kwargs()
    assert kwargs["servers"] == list(options.servers) and kwargs["nkeys_seed"] == str(seed)
    assert kwargs["tls"].verify_mode.name == "CERT_REQUIRED" and "user_credentials" not in kwargs


@pytest.mark.parametrize("argv, message", [
    (["--nats", ""], "at least one server"),
    (["--nats", "http://a:4222"], "not a NATS URL"),
    (["--nats", "nats://a:99999"], "not a NATS URL"),
    (["--creds", "/no/such.creds"], "no such file"),
    (["--tls-ca", "{tmp}"], "no such file"),  # a folder
    (["--creds", "{junk}"], "not a NATS creds file"),
    (["--nkey", "{junk}"], "not an nkey seed"),
    (["--tls-ca", "{junk}"], "cannot use the TLS files"),
    (["--tls-cert", "{junk}"], "go together"),
    (["--nkey", "{junk}", "--creds", "{junk}"], "give one"),
    (["--js-domain", "a.b"], "--js-domain"),
])
def test_bad_connection_flags_are_usage_errors(tmp_path, argv, message):
    junk = tmp_path / "junk"
    junk.write_text("not what the flag wants\n")
    with pytest.raises(UsageError, match=message):
        parse(*(a.format(tmp=tmp_path, junk=junk) for a in argv))


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory):
    """A nats-server that wants TLS with client certificates and one nkey user."""
    folder = tmp_path_factory.mktemp("secure")
    tls = write_tls(folder)
    seed, public = write_nkey(folder)
    conf = folder / "server.conf"
    conf.write_text(f"""
tls {{ cert_file: "{tls['server']}", key_file: "{tls['server_key']}", ca_file: "{tls['ca']}", verify: true }}
authorization {{ users = [ {{ nkey: {public} }} ] }}
""")
    server = start_nats_server(conf)
    try:
        yield server, tls, seed
    finally:
        server.stop()


async def test_connect_uses_tls_and_nkey_refuses_plaintext_and_a_refusal_ends_at_once(secure_server):
    server, tls, seed = secure_server
    good = NatsOptions(server.url, nkey=seed, tls_ca=tls["ca"], tls_cert=tls["client"], tls_key=tls["client_key"])
    nc = await connect(good, name="test")  # the server takes nothing but TLS with a client certificate
    try:
        sub = await nc.subscribe("hello")
        await nc.publish("hello", b"over tls")
        assert (await sub.next_msg(timeout=5)).data == b"over tls"
    finally:
        await nc.close()
    loop = asyncio.get_running_loop()
    for bad in (NatsOptions(server.url, tls_ca=tls["ca"], tls_cert=tls["client"], tls_key=tls["client_key"]),
                NatsOptions(server.url, nkey=seed, tls_ca=tls["server"])):  # no nkey; a CA that did not sign it
        started = loop.time()
        with pytest.raises(NatsUnreachable, match="refused this client"):
            await connect(bad, name="test", first_connect_s=120)
        assert loop.time() - started < 60  # it did not wait out first_connect_s: a refusal is final
    plain = start_nats_server(jetstream=False)
    try:
        with pytest.raises(NatsUnreachable, match="does not require TLS"):  # no silent plaintext
            await connect(NatsOptions(plain.url, tls_ca=tls["ca"]), name="test")
    finally:
        plain.stop()


def test_parallax_commands_take_the_flags_and_up_passes_them_on(tmp_path, capsys):
    import parallax.cli as cli

    assert cli.main(["status", "--nats", "nats://127.0.0.1:1", "--creds", str(tmp_path / "none.creds")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"parallax: error: --creds {tmp_path}/none.creds: no such file"]
    plan = cli.UpPlan("m", "m", [(0, 2)], "float32", "127.0.0.1", 8000)
    options = NatsOptions("nats://a:1,nats://b:2", js_domain="hub")
    for command in (cli.stage_command(plan, 0, 2, options), cli.gateway_command(plan, options)):
        assert command[command.index("--nats"):][:4] == ["--nats", "nats://a:1,nats://b:2", "--js-domain", "hub"]


# --- sites: servers, stages and a gateway in this process ----------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, list[int]]:
    """A 4-layer float32 random Llama and its greedy completion of PROMPT."""
    path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", layers=LAYERS)
    return path, reference_greedy(path, PROMPT, NEW_TOKENS)


def server_conf(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.conf"
    path.write_text(f'server_name: {name}\n{body}')
    return path


async def until_jetstream(options: NatsOptions, domain: str | None = None, limit_s: float = 20.0) -> None:
    """Until JetStream answers through ``options`` (a leaf link or a cluster's meta leader takes a moment)."""
    nc = await connect(options, name="test-wait")
    try:
        deadline = asyncio.get_running_loop().time() + limit_s
        while True:
            try:
                await nc.jetstream(domain=domain, timeout=0.25).account_info()
                return
            except (js_errors.Error, asyncio.TimeoutError, js_errors.ServiceUnavailableError):
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def serving(path: Path, stages: list[tuple[int, int, NatsOptions]], gateway: NatsOptions, first_delay_ms: float = 0.0,
                  **pipeline):
    """Stages (start, end, how each connects; the first one sleeps ``first_delay_ms`` after every step)
    and a NatsPipeline (``pipeline``: PipelineConfig fields); yields (pipeline, workers)."""
    running: list[tuple[asyncio.Event, asyncio.Task, StageWorker]] = []
    nc = pipe = None
    try:
        for start, end, options in stages:
            backend = await asyncio.to_thread(TorchBackend.load, path, "tiny", start, end, "float32", "cpu")
            config = WorkerConfig(nats=options, node_id=f"s{start}-{end}-{uuid.uuid4().hex[:4]}", heartbeat_s=0.2,
                                  debug_delay_ms=0.0 if running else first_delay_ms)
            worker = StageWorker(backend, config, EngineConfig(kv_blocks=256))
            stop, ready = asyncio.Event(), asyncio.Event()
            running.append((stop, asyncio.create_task(worker.run(stop, ready)), worker))
            await asyncio.wait_for(ready.wait(), 30)
        nc = await connect(gateway, name="test-gateway")
        pipe = NatsPipeline(nc, PipelineConfig(model="tiny", num_layers=LAYERS, js_domain=gateway.js_domain, **pipeline))
        await pipe.start()
        yield pipe, [w for _, _, w in running]
    finally:
        for stop, task, _ in running:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
        if pipe is not None:
            await pipe.close()
        if nc is not None:
            await nc.close()


async def until(condition, limit_s: float) -> None:
    """Until ``condition()`` (a bool, or a coroutine of one) holds; TimeoutError after ``limit_s``."""
    async def poll() -> None:
        while not ((await result) if asyncio.iscoroutine(result := condition()) else result):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), limit_s)


async def tokens(stream) -> list[int]:
    return [e.token async for e in stream]


async def greedy(pipe: NatsPipeline) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [e.token async for e in pipe.generate(uuid.uuid4().hex, PROMPT, params)]


@pytest.fixture(scope="module")
def hub_and_leaf(tmp_path_factory):
    """A hub (JetStream domain "hub") and a leaf-node site (domain "leaf") joined by a leaf link."""
    folder = tmp_path_factory.mktemp("sites")
    link = free_port()
    started: list[EmbeddedServer] = []
    try:
        started.append(start_nats_server(server_conf(folder, "hub", f"""
jetstream {{ domain: hub, store_dir: "{folder}/hub" }}
leafnodes {{ listen: "127.0.0.1:{link}" }}
""")))
        started.append(start_nats_server(server_conf(folder, "leaf", f"""
jetstream {{ domain: leaf, store_dir: "{folder}/leaf" }}
leafnodes {{ remotes: [ {{ url: "nats://127.0.0.1:{link}" }} ] }}
""")))
        yield started[0], started[1]
    finally:
        for server in started:
            server.stop()


async def test_registry_writes_from_a_leaf_site_land_in_the_hub(hub_and_leaf):
    """Every kind of registry write a leaf-side process makes (a heartbeat with a TTL, a compare-and-set,
    the lock, a delete) lands in the hub's bucket, never in the leaf's own domain."""
    hub, leaf = hub_and_leaf
    await until_jetstream(NatsOptions(leaf.url), "hub")
    leaf_nc = await connect(NatsOptions(leaf.url, js_domain="hub"), name="test-leaf")
    hub_nc = await connect(NatsOptions(hub.url), name="test-hub")
    try:
        bucket = CasBucket(await nodes_bucket(leaf_nc, "hub"))  # created from the leaf, in the hub
        seen = await nodes_bucket(hub_nc)
        key = f"stage.leaf-{uuid.uuid4().hex[:6]}"
        first = await bucket.put(key, b"beat 1", ttl_s=5)
        second = await bucket.write(key, b"beat 2", last=first)
        assert (await seen.get(key)).value == b"beat 2" and second > first
        with pytest.raises(js_errors.KeyWrongLastSequenceError):
            await bucket.write(key, b"stale", last=first)
        assert await bucket.lock(LEADER_KEY, b"leaf-scheduler", 0, ttl_s=5) is not None
        assert (await seen.get(LEADER_KEY)).value == b"leaf-scheduler"
        assert await bucket.delete(key, second)
        with pytest.raises(js_errors.KeyNotFoundError):
            await seen.get(key)
        with pytest.raises(js_errors.BucketNotFoundError):  # nothing went to the leaf's own JetStream
            await leaf_nc.jetstream().key_value(NODES_BUCKET)
    finally:
        await leaf_nc.close()
        await hub_nc.close()


async def test_a_pipeline_across_a_leaf_link_serves_the_reference(hub_and_leaf, tiny):
    """Stage 0:2 at the leaf site (registry in the hub's domain), stage 2:4, the gateway and a scheduler
    at the hub... and the scheduler's lock taken from the leaf side: a greedy completion equals the
    single-process reference. The hop leaf -> hub is logged (what the hub stage measured)."""
    hub, leaf = hub_and_leaf
    path, expected = tiny
    await until_jetstream(NatsOptions(leaf.url), "hub")
    leaf_side, hub_side = NatsOptions(leaf.url, js_domain="hub"), NatsOptions(hub.url)
    scheduler = Scheduler(SchedulerConfig(nats=leaf_side, node_id="leaf-sched", settle_s=0.1))
    stop, ready = asyncio.Event(), asyncio.Event()
    leading = asyncio.create_task(scheduler.run(stop, ready))
    try:
        async with serving(path, [(0, 2, leaf_side), (2, 4, hub_side)], hub_side) as (pipe, workers):
            assert await greedy(pipe) == expected
            log.info("leaf -> hub hop as stage 2:4 measured it (ms): %s", workers[1].stats()["hop_ms"])
            await asyncio.wait_for(ready.wait(), 10)
            await until(lambda: scheduler.leading, 10)
            status = await fetch_snapshot(hub_side)
            assert status[LEADER_KEY] == b"leaf-sched"
            assert {k.split(".")[0] for k in status} >= {"stage", "gateway", "scheduler"}
    finally:
        stop.set()
        await asyncio.wait_for(leading, 30)


@pytest.fixture
def three_servers(tmp_path):
    """A 3-server cluster (routes), JetStream on each."""
    routes = [free_port() for _ in range(3)]
    urls = ", ".join(f'"nats-route://127.0.0.1:{port}"' for port in routes)
    started: list[EmbeddedServer] = []
    try:
        for i, port in enumerate(routes):
            started.append(start_nats_server(server_conf(tmp_path, f"n{i}", f"""
jetstream {{ store_dir: "{tmp_path}/n{i}" }}
cluster {{ name: parallax, listen: "127.0.0.1:{port}", routes: [ {urls} ] }}
""")))
        yield started
    finally:
        for server in started:
            server.stop()


async def test_a_cluster_loses_a_server_mid_load_and_keeps_serving(three_servers, tiny):
    """Every process gets the three URLs. The registry bucket has 3 replicas. The server the gateway
    talks to is killed while 4 requests stream: they finish with the reference tokens (resumed after
    the reconnect), a stage heartbeat still lands and `parallax status` still reads the registry."""
    path, expected = tiny
    everyone = NatsOptions(tuple(s.url for s in three_servers))
    await until_jetstream(everyone)
    async with serving(path, [(0, 2, everyone), (2, 4, everyone)], everyone, first_delay_ms=15.0,
                       stall_timeout_s=1.5) as (pipe, workers):
        kv = await nodes_bucket(pipe.nc)
        assert (await kv.status()).stream_info.config.num_replicas == 3
        streams = [pipe.generate(uuid.uuid4().hex, PROMPT, SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                                                                           ignore_eos=True)) for _ in range(4)]
        firsts = [[(await anext(s)).token for _ in range(3)] for s in streams]  # every request is under way
        victim = next(s for s in three_servers if s.config.port == pipe.nc.connected_url.port)
        victim.stop()
        rests = await asyncio.wait_for(asyncio.gather(*(tokens(s) for s in streams)), 120)
        assert [first + rest for first, rest in zip(firsts, rests)] == [expected] * 4
        stage_key = f"stage.{workers[0].config.node_id}"
        survivors = NatsOptions(tuple(s.url for s in three_servers if s is not victim))
        before = (await kv.get(stage_key)).revision

        async def beat_landed() -> bool:
            return (await kv.get(stage_key)).revision > before

        await until(beat_landed, 30)
        snapshot = await fetch_snapshot(survivors)
        assert {stage_key, f"stage.{workers[1].config.node_id}"} <= set(snapshot)
