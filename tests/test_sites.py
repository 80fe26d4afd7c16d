"""How processes connect (NatsOptions and the shared flags, TLS and nkeys against a real server), and
the sites of issue 13 with authenticated roles and TLS on, as deploy/ ships them: a hub and a leaf-node
site with their own JetStream domains joined over mutual TLS, and a 3-server cluster (routes over
mutual TLS) with a replicated registry that loses a server mid-load."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import errors as js_errors

from parallax.broker.cli import add_nats_args, nats_options
from parallax.broker.connection import DEFAULT_URL, NatsOptions, connect
from parallax.broker.errors import NatsUnreachable, RegistryError, UsageError
from parallax.broker.kv import NODES_BUCKET, CasBucket, nodes_bucket
from parallax.broker.registry import LEADER_KEY
from parallax.broker.server import EmbeddedServer, free_port
from parallax.broker.wire import SamplingParams
from parallax.gateway.nats_pipeline import NatsPipeline, PipelineConfig
from parallax.scheduler.service import Scheduler, SchedulerConfig
from parallax.stages.engine import EngineConfig
from parallax.stages.torch_backend import TorchBackend
from parallax.stages.worker import StageWorker, WorkerConfig
from parallax.status import fetch_snapshot

from .cluster import make_tiny_model, reference_greedy
from .conftest import deploy_config, start_nats_server

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


# --- sites with auth and TLS: servers from deploy/, stages and a gateway in this process -------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, list[int]]:
    """A 4-layer float32 random Llama and its greedy completion of PROMPT."""
    path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", layers=LAYERS)
    return path, reference_greedy(path, PROMPT, NEW_TOKENS)


@pytest.fixture(scope="module")
def auth_dir(tmp_path_factory) -> Path:
    """``parallax auth init``: an nkey per role, their permissions, a CA and the servers' certificate."""
    import parallax.cli as cli

    directory = tmp_path_factory.mktemp("sites") / "auth"
    assert cli.main(["auth", "init", str(directory)]) == 0
    return directory


def as_role(auth_dir: Path, role: str, servers: list[EmbeddedServer], js_domain: str | None = None) -> NatsOptions:
    """How a process of ``role`` connects: ``--nats tls://... --nkey DIR/<role>.nk --tls-ca DIR/ca.pem``."""
    return NatsOptions(tuple(s.url.replace("nats://", "tls://") for s in servers), nkey=auth_dir / f"{role}.nk",
                       tls_ca=auth_dir / "ca.pem", js_domain=js_domain)


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
async def serving(path: Path, stages: list[tuple[int, int, NatsOptions | Callable[[NATS], NatsOptions]]], gateway: NatsOptions,
                  first_delay_ms: float = 0.0, **pipeline):
    """The gateway's connection, stages (start, end, how each connects: options, or options made from the
    gateway's connection; the first one sleeps ``first_delay_ms`` after every step) and a NatsPipeline
    (``pipeline``: PipelineConfig fields); yields (pipeline, workers)."""
    running: list[tuple[asyncio.Event, asyncio.Task, StageWorker]] = []
    nc = await connect(gateway, name="test-gateway")
    pipe = None
    try:
        for start, end, options in stages:
            backend = await asyncio.to_thread(TorchBackend.load, path, "tiny", start, end, "float32", "cpu")
            config = WorkerConfig(nats=options if isinstance(options, NatsOptions) else options(nc),
                                  node_id=f"s{start}-{end}-{uuid.uuid4().hex[:4]}", heartbeat_s=0.2,
                                  debug_delay_ms=0.0 if running else first_delay_ms)
            worker = StageWorker(backend, config, EngineConfig(kv_blocks=256))
            stop, ready = asyncio.Event(), asyncio.Event()
            running.append((stop, asyncio.create_task(worker.run(stop, ready)), worker))
            await asyncio.wait_for(ready.wait(), 30)
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
        await nc.close()


async def until(condition, limit_s: float) -> None:
    """Until ``condition()`` (a bool, or a coroutine of one) holds; TimeoutError after ``limit_s``."""
    async def poll() -> None:
        while not ((await result) if asyncio.iscoroutine(result := condition()) else result):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), limit_s)


def greedy_params() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


async def greedy(pipe: NatsPipeline) -> list[int]:
    return [e.token async for e in pipe.generate(uuid.uuid4().hex, PROMPT, greedy_params())]


def permission_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "permission" in r.getMessage()]


@pytest.fixture(scope="module")
def hub_and_leaf(auth_dir: Path):
    """deploy/nats-server.conf (the hub, JetStream domain "hub") and deploy/leaf-site.conf (a site, domain
    "site-a") as shipped, on free ports: the site's server dials the hub over mutual TLS as the leaf role."""
    link = free_port()
    hub_conf = deploy_config(auth_dir, "nats-server.conf", **{"port: 7422": f"port: {link}", "http: ": "# http: "})
    site_conf = deploy_config(auth_dir, "leaf-site.conf", **{"hub.example.com:7422": f"127.0.0.1:{link}", "http: ": "# "})
    started: list[EmbeddedServer] = []
    try:
        started.append(start_nats_server(hub_conf))
        started.append(start_nats_server(site_conf))
        yield started[0], started[1]
    finally:
        for server in started:
            server.stop()


async def test_registry_writes_from_a_leaf_site_land_in_the_hub(hub_and_leaf, auth_dir):
    """Every kind of registry write a leaf-side process makes under its role (a stage: a heartbeat with
    a TTL, a compare-and-set, a delete; a scheduler: the lock) lands in the hub's bucket, never in the
    site's own domain."""
    hub, site = hub_and_leaf
    await until_jetstream(as_role(auth_dir, "admin", [site]), "hub")
    stage_nc = await connect(as_role(auth_dir, "stage", [site], "hub"), name="test-leaf-stage")
    scheduler_nc = await connect(as_role(auth_dir, "scheduler", [site], "hub"), name="test-leaf-scheduler")
    hub_nc = await connect(as_role(auth_dir, "admin", [hub]), name="test-hub")
    try:
        bucket = CasBucket(await nodes_bucket(stage_nc, "hub"))  # created from the site, in the hub
        seen = await nodes_bucket(hub_nc)
        key = f"stage.leaf-{uuid.uuid4().hex[:6]}"
        first = await bucket.put(key, b"beat 1", ttl_s=5)
        second = await bucket.write(key, b"beat 2", last=first)
        assert (await seen.get(key)).value == b"beat 2" and second > first
        with pytest.raises(js_errors.KeyWrongLastSequenceError):
            await bucket.write(key, b"stale", last=first)
        lock = CasBucket(await nodes_bucket(scheduler_nc, "hub"))
        assert await lock.lock(LEADER_KEY, b"leaf-scheduler", 0, ttl_s=5) is not None
        assert (await seen.get(LEADER_KEY)).value == b"leaf-scheduler"
        assert await bucket.delete(key, second)
        with pytest.raises(js_errors.KeyNotFoundError):
            await seen.get(key)
        with pytest.raises(js_errors.BucketNotFoundError):  # nothing went to the site's own JetStream
            await stage_nc.jetstream().key_value(NODES_BUCKET)
    finally:
        for nc in (stage_nc, scheduler_nc, hub_nc):
            await nc.close()


async def test_a_pipeline_across_a_leaf_link_serves_the_reference(hub_and_leaf, auth_dir, tiny, caplog):
    """Stage 0:2 at the site (registry in the hub's domain), stage 2:4 and the gateway at the hub, and a
    scheduler at the site, each with its role's nkey and the CA: a greedy completion equals the
    single-process reference, the scheduler's lock is taken from the site, and no process is denied
    anything. The hop site -> hub is logged (what the hub stage measured)."""
    hub, site = hub_and_leaf
    path, expected = tiny
    await until_jetstream(as_role(auth_dir, "admin", [site]), "hub")
    site_stage, hub_stage = as_role(auth_dir, "stage", [site], "hub"), as_role(auth_dir, "stage", [hub])
    scheduler = Scheduler(SchedulerConfig(nats=as_role(auth_dir, "scheduler", [site], "hub"), node_id="leaf-sched",
                                          settle_s=0.1))
    stop, ready = asyncio.Event(), asyncio.Event()
    leading = asyncio.create_task(scheduler.run(stop, ready))
    try:
        async with serving(path, [(0, 2, site_stage), (2, 4, hub_stage)], as_role(auth_dir, "gateway", [hub])) as (pipe, workers):
            assert await greedy(pipe) == expected
            log.info("leaf -> hub hop as stage 2:4 measured it (ms): %s", workers[1].stats()["hop_ms"])
            await asyncio.wait_for(ready.wait(), 10)
            await until(lambda: scheduler.leading, 10)
            status = await fetch_snapshot(as_role(auth_dir, "admin", [hub]))
            assert status[LEADER_KEY] == b"leaf-sched"
            assert {k.split(".")[0] for k in status} >= {"stage", "gateway", "scheduler"}
    finally:
        stop.set()
        await asyncio.wait_for(leading, 30)
    assert permission_lines(caplog) == []


@pytest.fixture
def three_servers(auth_dir: Path):
    """deploy/cluster.conf as shipped on three servers (routes over mutual TLS, JetStream domain "hub"),
    each named and given free ports."""
    routes = [free_port() for _ in range(3)]
    names = {f"nats-{k + 1}.example.com:6222": f"127.0.0.1:{port}" for k, port in enumerate(routes)}
    started: list[EmbeddedServer] = []
    try:
        for i, port in enumerate(routes):
            conf = deploy_config(auth_dir, "cluster.conf", **names, **{
                "server_name: $PARALLAX_NATS_NAME": f"server_name: nats-{i + 1}", "0.0.0.0:6222": f"127.0.0.1:{port}",
                "port: 7422": f"port: {free_port()}", "http: ": "# http: "})
            started.append(start_nats_server(conf))
        yield started
    finally:
        for server in started:
            server.stop()


async def test_a_cluster_loses_a_server_mid_load_and_keeps_serving(three_servers, auth_dir, tiny, caplog):
    """The processes connect with their role's nkey and the CA; the gateway and stage 2:4 get the three URLs,
    stage 0:2 only the URL of the server the gateway landed on (it learns the others from the cluster). The
    registry bucket has 3 replicas. That server stops while 4 requests stream: the gateway and stage 0:2
    reconnect to others; the gateway resumes the requests as soon as it is back (neither ``stall_timeout_s``,
    left at its default, nor ``first_token_timeout_s`` passes), sends each once stage 0:2 is back too, and
    they finish with the reference tokens; a stage heartbeat still lands and `parallax status` still reads
    the registry."""
    path, expected = tiny
    everyone = lambda role: as_role(auth_dir, role, three_servers)  # noqa: E731
    by_port = {s.config.port: s for s in three_servers}
    beside_gateway = lambda gateway_nc: as_role(auth_dir, "stage", [by_port[gateway_nc.connected_url.port]])  # noqa: E731
    await until_jetstream(everyone("admin"))
    async with serving(path, [(0, 2, beside_gateway), (2, 4, everyone("stage"))], everyone("gateway"),
                       first_delay_ms=15.0) as (pipe, workers):
        assert pipe.config.stall_timeout_s > 10 and pipe.config.first_token_timeout_s > 60
        kv = await nodes_bucket(pipe.nc)
        assert (await kv.status()).stream_info.config.num_replicas == 3
        rids = [uuid.uuid4().hex for _ in range(4)]
        streams = [pipe.generate(rid, PROMPT, greedy_params()) for rid in rids]
        firsts = [[(await anext(s)).token for _ in range(3)] for s in streams]  # every request is under way
        stage_key = f"stage.{workers[0].config.node_id}"
        before = (await kv.get(stage_key)).revision
        victim = by_port[pipe.nc.connected_url.port]
        assert workers[0].nc.connected_url.port == victim.config.port
        stopped = time.time()
        victim.stop()  # the process ends; JetStream hands its leaderships over (a SIGKILL: README)
        rests = await asyncio.wait_for(asyncio.gather(*(timed(s) for s in streams)), 60)
        assert [first + [t for t, _ in rest] for first, rest in zip(firsts, rests)] == [expected] * 4
        assert workers[0].nc.connected_url.port != victim.config.port
        resumes = [(r.created, r.getMessage()) for r in caplog.records if "resuming on live replicas" in r.getMessage()]
        for rid, rest in zip(rids, rests):  # each resumed first for the reconnect (a registry outage may add more)
            at, line = next((at, line) for at, line in resumes if rid in line)
            assert "connection was lost and is back" in line, resumes
            log.info("server stopped -> request resumed %.3f s -> its next token %.3f s", at - stopped,
                     next(t for _, t in rest if t >= at) - stopped)

        async def beat_landed() -> bool:
            with contextlib.suppress(nats.errors.TimeoutError, js_errors.Error):
                return (await kv.get(stage_key)).revision > before
            return False

        await until(beat_landed, 30)
        log.info("server stopped -> a stage heartbeat lands again: %.1f s", time.time() - stopped)
        survivors = as_role(auth_dir, "admin", [s for s in three_servers if s is not victim])

        async def status_lists_both() -> bool:  # a replica that was behind catches up (direct gets read any replica)
            with contextlib.suppress(RegistryError):
                return {stage_key, f"stage.{workers[1].config.node_id}"} <= set(await fetch_snapshot(survivors))
            return False

        await until(status_lists_both, 30)
    assert permission_lines(caplog) == []


async def timed(stream) -> list[tuple[int, float]]:
    """The rest of a token stream, each token with the time it came (``time.time()``)."""
    return [(e.token, time.time()) async for e in stream]
