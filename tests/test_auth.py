"""Authenticated roles and TLS on a real nats-server configured from ``parallax auth init``'s output:
who may connect, what each role may publish and subscribe to, and a whole pipeline (two tiny stages
and a gateway, in this process) serving a greedy completion with auth and TLS on; every stage is a
``nats.micro`` service (``$SRV.PING/INFO/STATS``)."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import ssl
import stat
import subprocess
import uuid
from pathlib import Path

import nats
import nkeys
import orjson
import pytest
from cryptography import x509

from parallax import cli
from parallax.auth import ROLES, public_key
from parallax.broker import subjects
from parallax.broker.connection import NatsOptions, connect
from parallax.broker.errors import NatsUnreachable
from parallax.broker.kv import CasBucket, Presence, nodes_bucket
from parallax.broker.registry import LEADER_KEY, NodeInfo, assign_key
from parallax.broker.server import nats_server_binary
from parallax.broker.wire import SamplingParams
from parallax.gateway.nats_pipeline import NatsPipeline, PipelineConfig
from parallax.stages.engine import EngineConfig
from parallax.stages.micro import SERVICE
from parallax.stages.torch_backend import TorchBackend
from parallax.stages.worker import StageWorker, WorkerConfig
from tests.cluster import make_tiny_model, reference_greedy
from tests.conftest import DEPLOY, deploy_config, start_nats_server

HOSTS = ("parallax-hub.example", "10.1.2.3")
DENIED_S = 0.5  # how long a JetStream write waits for the ack a denied publish never gets


@pytest.fixture(scope="module")
def auth_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("secure") / "auth"
    assert cli.main(["auth", "init", str(directory), *(f"--host={h}" for h in HOSTS)]) == 0
    return directory


@pytest.fixture(scope="module")
def server(auth_dir: Path):
    """nats-server with JetStream, the roles of auth.conf and TLS (tls.conf), included as the docs say."""
    conf = auth_dir.parent / "server.conf"
    conf.write_text(f"include {auth_dir.name}/auth.conf\ninclude {auth_dir.name}/tls.conf\n")
    srv = start_nats_server(extra_args=("-c", str(conf)))
    yield srv
    srv.stop()


def tls_url(srv) -> str:
    return srv.url.replace("nats://", "tls://")


def options(srv, auth_dir: Path, role: str | None, ca: bool = True) -> NatsOptions:
    """How a Parallax process of ``role`` connects (--nats tls://... --nkey DIR/<role>.nk --tls-ca DIR/ca.pem)."""
    return NatsOptions(tls_url(srv), nkey=None if role is None else auth_dir / f"{role}.nk",
                       tls_ca=auth_dir / "ca.pem" if ca else None)


async def connect_as(srv, auth_dir: Path, role: str | None, errors: list[str] | None = None, **options):
    """A connection as ``role`` (None: no credentials), trusting the CA; permission errors go to ``errors``."""

    async def on_error(e: Exception) -> None:
        if errors is not None:
            errors.append(str(e))

    options.setdefault("tls", ssl.create_default_context(cafile=str(auth_dir / "ca.pem")))
    if role is not None:
        options["nkeys_seed"] = str(auth_dir / f"{role}.nk")
    return await nats.connect(tls_url(srv), allow_reconnect=False, connect_timeout=5, error_cb=on_error, **options)


async def until(check, timeout: float = 3.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if check():
            return True
        await asyncio.sleep(0.02)
    return check()


def collect(into: list, decode=lambda data: data):
    async def cb(msg) -> None:
        into.append(decode(msg.data))

    return cb


def denied(errors: list[str], verb: str, subject: str) -> bool:
    """nats-py reports ``-ERR 'Permissions Violation for Publish to "subj"'`` (lower-cased)."""
    if not verb.startswith("permission"):
        verb = f"permissions violation for {verb}"
    return any(f'{verb} to "{subject.lower()}"' in e.lower() for e in errors)


def logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "parallax.broker.connection"]


async def registry_value(admin, key: str) -> bytes | None:
    kv = await nodes_bucket(admin)
    try:
        return (await kv.get(key)).value
    except nats.js.errors.KeyNotFoundError:
        return None


# --- auth init ---------------------------------------------------------------------------------------
def test_init_writes_private_seeds_and_a_server_certificate_for_the_hosts(auth_dir: Path):
    assert stat.S_IMODE(auth_dir.stat().st_mode) == 0o700
    conf = (auth_dir / "auth.conf").read_text()
    for role in ROLES:
        assert stat.S_IMODE((auth_dir / f"{role}.nk").stat().st_mode) == 0o600
        assert stat.S_IMODE((auth_dir / f"{role}-key.pem").stat().st_mode) == 0o600
        assert public_key(auth_dir / f"{role}.nk") in conf
    ca = x509.load_pem_x509_certificate((auth_dir / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((auth_dir / "server-cert.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(n.value) for n in san}
    assert {"localhost", "127.0.0.1", *HOSTS} <= names


def test_init_refuses_an_existing_directory_without_force(auth_dir: Path, tmp_path: Path, capsys):
    target = tmp_path / "again"
    assert cli.main(["auth", "init", str(target)]) == 0
    seed = (target / "stage.nk").read_bytes()
    capsys.readouterr()
    assert cli.main(["auth", "init", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err, err
    assert (target / "stage.nk").read_bytes() == seed
    assert cli.main(["auth", "init", str(target), "--force"]) == 0
    assert (target / "stage.nk").read_bytes() != seed
    assert cli.main(["auth", "init", str(tmp_path / "bad"), "--host", "a b"]) == 2


# --- deploy/ ------------------------------------------------------------------------------------------
def test_deploy_configs_are_valid_with_auth_inits_output(auth_dir: Path):
    """Every nats-server config in deploy/ parses (``nats-server -t``) with auth/ from auth init next to it."""
    configs = sorted(DEPLOY.glob("*.conf"))
    assert {c.name for c in configs} >= {"nats-server.conf", "leaf-site.conf", "cluster.conf"}
    for conf in configs:
        done = subprocess.run([nats_server_binary(), "-t", "-c", str(deploy_config(auth_dir, conf.name))],
                              capture_output=True, text=True, timeout=30, env={**os.environ, "PARALLAX_NATS_NAME": "nats-1"})
        assert done.returncode == 0, (conf.name, done.stdout + done.stderr)


def deploy_commands() -> list[list[str]]:
    """The Parallax command lines of deploy/compose.yaml and deploy/systemd (their defaults filled in)."""
    import yaml

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    lines = [s["command"] for s in compose["services"].values() if s["command"][0].startswith("parallax-")]
    for unit in sorted((DEPLOY / "systemd").glob("parallax-*.service")):
        text = unit.read_text()
        env = dict(re.findall(r'^Environment="?(\w+)=(.*?)"?$', text, re.M))
        exec_start = re.search(r"^ExecStart=(.*)$", text, re.M).group(1).replace("%i", "0:3")
        words = shlex.split(re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], exec_start))
        lines.append([Path(words[0]).name, *words[1:]])
    return lines


def test_deploy_command_lines_use_flags_the_commands_take(auth_dir: Path):
    from parallax.broker.cli import nats_options
    from parallax.gateway.cli import parse_args as gateway_args
    from parallax.scheduler.cli import parse_args as scheduler_args
    from parallax.stages.cli import parse_args as stage_args

    parsers = {"parallax-stage": stage_args, "parallax-gateway": gateway_args, "parallax-scheduler": scheduler_args}
    lines = deploy_commands()
    assert {line[0] for line in lines} == set(parsers)
    for line in lines:
        args = parsers[line[0]]([word.replace("/etc/parallax/auth", str(auth_dir)) for word in line[1:]])
        options = nats_options(args)  # the role's seed and the CA exist and are what they claim
        assert options.nkey == auth_dir / f"{line[0].removeprefix('parallax-')}.nk" and options.tls_ca is not None, line


# --- who may connect ---------------------------------------------------------------------------------
async def test_a_connection_without_valid_credentials_is_refused(server, auth_dir: Path, tmp_path: Path):
    with pytest.raises(NatsUnreachable, match="refused this client.*(?i:authorization)"):
        await connect(options(server, auth_dir, None), "no-credentials")
    stranger = tmp_path / "stranger.nk"  # a well-formed nkey the server does not know
    stranger.write_bytes(nkeys.encode_seed(bytes(32), nkeys.PREFIX_BYTE_USER))
    with pytest.raises(Exception, match="(?i)authorization"):
        await nats.connect(tls_url(server), allow_reconnect=False, connect_timeout=5, nkeys_seed=str(stranger),
                           tls=ssl.create_default_context(cafile=str(auth_dir / "ca.pem")))
    nc = await connect_as(server, auth_dir, "stage")  # the same path with a known key works
    await nc.close()


async def test_tls_without_the_ca_is_refused(server, auth_dir: Path):
    with pytest.raises(ssl.SSLCertVerificationError):
        await connect_as(server, auth_dir, "admin", tls=ssl.create_default_context())
    with pytest.raises(NatsUnreachable, match="refused this client"):  # the system's CAs do not know ours
        await connect(options(server, auth_dir, "admin", ca=False), "no-ca")


# --- what each role may do ---------------------------------------------------------------------------
async def test_a_stage_cannot_write_assignments_or_the_leader_but_its_own_key(server, auth_dir: Path, caplog):
    stage, admin = await connect(options(server, auth_dir, "stage"), "stage"), await connect_as(server, auth_dir, "admin")
    try:
        bucket = CasBucket(await nodes_bucket(stage, timeout_s=DENIED_S))
        node = f"n{uuid.uuid4().hex[:6]}"
        for key in (assign_key(node), LEADER_KEY):
            with pytest.raises(nats.errors.TimeoutError):  # the server drops the write: no ack comes
                await bucket.create(key, b'{"node_id": "x", "model": "m", "start": 0, "end": 1}')
            assert await until(lambda: denied(logged(caplog), "permission denied: permissions violation for publish",
                                              f"$KV.parallax-nodes.{key}")), logged(caplog)
            assert await registry_value(admin, key) is None
        assert not stage.is_closed  # a denied publish is logged, the connection stays
        async with Presence(bucket.kv, lambda: NodeInfo(node_id=node, kind="stage"), 5.0):
            assert await registry_value(admin, f"stage.{node}") is not None
    finally:
        await stage.close()
        await admin.close()


async def test_a_stage_cannot_read_a_gateways_replies_or_answer_for_others(server, auth_dir: Path):
    errors: list[str] = []
    stage = await connect_as(server, auth_dir, "stage", errors)
    gateway, admin = await connect_as(server, auth_dir, "gateway"), await connect_as(server, auth_dir, "admin")
    try:
        reply_subject = subjects.gateway("g1")
        snooped, delivered = [], []
        await stage.subscribe(reply_subject, cb=collect(snooped))
        await gateway.subscribe(reply_subject, cb=collect(delivered))
        await stage.flush()
        assert await until(lambda: denied(errors, "subscription", reply_subject)), errors
        await stage.publish(reply_subject, b"token")  # stages do send tokens to gateways
        await stage.flush()
        assert await until(lambda: delivered == [b"token"]) and snooped == []

        # parallax.stats: a stage answers the requests it gets, and cannot ask others or answer for them
        async def answer(msg) -> None:
            await stage.publish(msg.reply, b'{"node_id": "mine"}')

        await stage.subscribe(subjects.STATS, cb=answer)
        await stage.flush()
        inbox, answers = admin.new_inbox(), []
        await admin.subscribe(inbox, cb=collect(answers))
        await stage.publish(inbox, b'{"node_id": "forged"}')
        await stage.publish(subjects.STATS, b'{"reset": true}')
        await stage.flush()
        assert await until(lambda: denied(errors, "publish", inbox) and denied(errors, "publish", subjects.STATS)), errors
        await admin.publish(subjects.STATS, b"{}", reply=inbox)
        assert await until(lambda: answers == [b'{"node_id": "mine"}'])
        await asyncio.sleep(0.1)
        assert answers == [b'{"node_id": "mine"}']
    finally:
        for nc in (stage, gateway, admin):
            await nc.close()


async def test_only_a_scheduler_writes_assignments(server, auth_dir: Path):
    errors: list[str] = []
    gateway = await connect_as(server, auth_dir, "gateway", errors)
    scheduler, admin = await connect_as(server, auth_dir, "scheduler"), await connect_as(server, auth_dir, "admin")
    try:
        node = f"n{uuid.uuid4().hex[:6]}"
        value = b'{"node_id": "x", "model": "m", "start": 0, "end": 1}'
        with pytest.raises(nats.errors.TimeoutError):
            await CasBucket(await nodes_bucket(gateway, timeout_s=DENIED_S)).create(assign_key(node), value)
        assert await until(lambda: denied(errors, "publish", f"$KV.parallax-nodes.{assign_key(node)}")), errors
        assert await registry_value(admin, assign_key(node)) is None
        await CasBucket(await nodes_bucket(scheduler)).create(assign_key(node), value)
        assert await registry_value(admin, assign_key(node)) == value
    finally:
        for nc in (gateway, scheduler, admin):
            await nc.close()


# --- a pipeline with auth and TLS on, and the stages as nats.micro services --------------------------
async def gather(nc, subject: str, expect: int, timeout: float = 3.0) -> list[dict]:
    """Every answer to one request on ``subject`` (several services answer a $SRV request)."""
    inbox, answers = nc.new_inbox(), []
    sub = await nc.subscribe(inbox, cb=collect(answers, orjson.loads))
    await nc.publish(subject, b"", reply=inbox)
    await until(lambda: len(answers) >= expect, timeout)
    await asyncio.sleep(0.1)  # and no more than that
    await sub.unsubscribe()
    return answers


@pytest.mark.slow
async def test_a_pipeline_serves_with_auth_and_tls_and_stages_are_micro_services(server, auth_dir: Path, tmp_path: Path,
                                                                                 caplog):
    path = await asyncio.to_thread(make_tiny_model, tmp_path / "tiny")
    prompt = [5, 17, 42, 7]
    expected = await asyncio.to_thread(reference_greedy, path, prompt, 6)
    stop, stages, pipeline = asyncio.Event(), [], None
    gateway_nc = await connect(options(server, auth_dir, "gateway"), "gateway")
    admin = await connect_as(server, auth_dir, "admin")
    try:
        for start, end in ((0, 3), (3, 6)):  # each stage connects on its own, as the stage role, like parallax-stage
            backend = await asyncio.to_thread(TorchBackend.load, path, "tiny", start, end, "float32", "cpu")
            config = WorkerConfig(nats=options(server, auth_dir, "stage"), node_id=f"s{start}-{uuid.uuid4().hex[:6]}",
                                  heartbeat_s=0.2)
            worker, ready = StageWorker(backend, config, EngineConfig(kv_blocks=64)), asyncio.Event()
            stages.append((worker, asyncio.create_task(worker.run(stop, ready))))
            await asyncio.wait_for(ready.wait(), 30)
        workers = [w for w, _ in stages]
        pipeline = NatsPipeline(gateway_nc, PipelineConfig(model="tiny", num_layers=6, chain_wait_s=5))
        await pipeline.start()
        assert await until(lambda: not pipeline.missing(), 5)
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        tokens = [e.token async for e in pipeline.generate(uuid.uuid4().hex, prompt, params)]
        assert tokens == expected

        pings = await gather(admin, f"$SRV.PING.{SERVICE}", 2)
        assert sorted(p["name"] for p in pings) == [SERVICE, SERVICE]
        infos = {i["metadata"]["node_id"]: i for i in await gather(admin, f"$SRV.INFO.{SERVICE}", 2)}
        assert {n: i["metadata"]["layers"] for n, i in infos.items()} == {
            w.config.node_id: f"{w.spec.start}:{w.spec.end}" for w in workers}
        assert {(i["metadata"]["model"], i["metadata"]["backend"]) for i in infos.values()} == {("tiny", "torch")}
        stats = {s["metadata"]["node_id"]: s["endpoints"][0]["data"] for s in await gather(admin, f"$SRV.STATS.{SERVICE}", 2)}
        assert set(stats) == set(infos)
        for data in stats.values():
            assert data["requests"] == 1 and data["errors"] == {} and data["steps"] >= 1
            assert set(data["load"]) >= {"running", "waiting", "kv_blocks_used", "kv_blocks_total"}
        one = await admin.request(subjects.stage(workers[0].config.node_id), b"", timeout=3)
        assert orjson.loads(one.data)["node_id"] == workers[0].config.node_id
        assert not [line for line in logged(caplog) if "permission" in line]  # the roles allow all the pipeline does
    finally:
        if pipeline is not None:
            await pipeline.close()
        stop.set()
        for _, task in stages:
            await task
        for nc in (gateway_nc, admin):
            await nc.close()
