"""Authenticated roles and TLS on a real nats-server configured from ``parallax auth init``'s output:
who may connect, what each role may publish and subscribe to (a per-node stage credential: only its
own registry key, layer subjects and endpoint), and a whole pipeline (two tiny stages, one with its
per-node credential, and a gateway, in this process) serving a greedy completion with auth and TLS on;
every stage is a ``nats.micro`` service (``$SRV.PING/INFO/STATS``)."""

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
from parallax.auth import ROLES, public_key, stage_nodes
from parallax.broker import subjects
from parallax.broker.connection import NatsOptions, connect
from parallax.broker.errors import NatsUnreachable
from parallax.broker.kv import CasBucket, Presence, nodes_bucket
from parallax.broker.registry import LEADER_KEY, NodeInfo, assign_key, node_key
from parallax.broker.server import nats_server_binary
from parallax.broker.wire import SamplingParams
from parallax.gateway.nats_pipeline import NatsPipeline, PipelineConfig
from parallax.stages.engine import EngineConfig
from parallax.stages.micro import SERVICE
from parallax.stages.torch_backend import TorchBackend
from parallax.stages.worker import StageWorker, WorkerConfig
from parallax.watch import evict
from tests.cluster import make_tiny_model, reference_greedy
from tests.conftest import DEPLOY, deploy_config, start_nats_server

HOSTS = ("parallax-hub.example", "10.1.2.3")
NODE = "edge-a"  # a stage node named at auth init (--stage): its credential is the role "stage-edge-a"
ADDED = "edge_b-2"  # one added later (auth add-stage), before the server starts
DENIED_S = 0.5  # how long a JetStream write waits for the ack a denied publish never gets


@pytest.fixture(scope="module")
def auth_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("secure") / "auth"
    assert cli.main(["auth", "init", str(directory), *(f"--host={h}" for h in HOSTS), "--stage", NODE]) == 0
    assert cli.main(["auth", "add-stage", str(directory), ADDED]) == 0
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
    assert stage_nodes(auth_dir) == [NODE, ADDED]
    for node in (NODE, ADDED):
        assert stat.S_IMODE((auth_dir / f"stage-{node}.nk").stat().st_mode) == 0o600
        assert public_key(auth_dir / f"stage-{node}.nk") in conf
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


def test_stage_node_ids_are_checked_and_keys_are_added_once(tmp_path: Path, capsys):
    """A per-node credential's node id is one registry key token and one subject token, the same in both."""
    for bad in ("a.b", "*", ">", "a b", "_a", "", "x/y"):
        assert cli.main(["auth", "init", str(tmp_path / "bad"), "--stage", bad]) == 2, bad
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "node id" in err, err
    assert not (tmp_path / "bad").exists()
    assert cli.main(["auth", "init", str(tmp_path / "bad"), "--stage", "x", "--stage", "x"]) == 2
    assert cli.main(["auth", "add-stage", str(tmp_path / "none"), "x"]) == 2  # not an auth init folder
    assert "auth init" in capsys.readouterr().err

    target = tmp_path / "auth"
    assert cli.main(["auth", "init", str(target), "--stage", "n1"]) == 0
    before = {f"{r}.nk": (target / f"{r}.nk").read_bytes() for r in ROLES}
    assert cli.main(["auth", "add-stage", str(target), "n2"]) == 0
    assert cli.main(["auth", "add-stage", str(target), "n2"]) == 2  # never replaces a node's key silently
    assert cli.main(["auth", "add-stage", str(target), "n.3"]) == 2
    assert stage_nodes(target) == ["n1", "n2"] and {f: (target / f).read_bytes() for f in before} == before
    conf = (target / "auth.conf").read_text()
    assert conf.count("$KV.parallax-nodes.stage.n2") == 2  # direct and $JS.*.API. (through a leaf)
    assert cli.main(["auth", "init", str(target), "--force", "--stage", "n3"]) == 0  # --force: only the nodes named
    assert stage_nodes(target) == ["n3"] and "stage.n1" not in (target / "auth.conf").read_text()


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


async def test_a_stage_nodes_credential_writes_only_its_own_key_and_only_admin_evicts(server, auth_dir: Path):
    """``stage-<NODE>.nk`` may write and delete ``stage.<NODE>`` alone (so cannot evict another stage),
    receive only its own layer subjects and serve only its own ``parallax.stage.<NODE>``; admin evicts."""
    errors: list[str] = []
    mine = await connect_as(server, auth_dir, f"stage-{NODE}", errors)
    admin = await connect_as(server, auth_dir, "admin")
    try:
        other = f"n{uuid.uuid4().hex[:6]}"  # a ghost stage's record (updated 0: no heartbeat for long)
        other_key = node_key("stage", other)
        await (await nodes_bucket(admin)).put(other_key, NodeInfo(node_id=other).model_dump_json().encode())
        kv = await nodes_bucket(mine, timeout_s=DENIED_S)
        with pytest.raises(nats.errors.TimeoutError):  # write: the server drops it, no ack comes
            await kv.put(other_key, NodeInfo(node_id=other, host="forged").model_dump_json().encode())
        with pytest.raises(nats.errors.TimeoutError):  # delete (a DEL marker on the same subject): the same
            await kv.delete(other_key)
        assert await until(lambda: denied(errors, "publish", f"$KV.parallax-nodes.{other_key}")), errors
        assert NodeInfo.model_validate_json(await registry_value(admin, other_key)).host == ""
        for key in (other_key, node_key("stage", NODE)):  # through a leaf: the same rule on the domain's subject
            await mine.publish(f"$JS.hub.API.$KV.parallax-nodes.{key}", b"{}")
        await mine.flush()
        assert await until(lambda: denied(errors, "publish", f"$JS.hub.API.$KV.parallax-nodes.{other_key}")), errors

        async with Presence(kv, lambda: NodeInfo(node_id=NODE, kind="stage"), 5.0):  # its own key: written
            assert await registry_value(admin, node_key("stage", NODE)) is not None
        assert await registry_value(admin, node_key("stage", NODE)) is None  # and deleted on the way out

        for subject in (subjects.node("tiny", 0, 3, other), subjects.stage(other)):  # another node's work, endpoint
            await mine.subscribe(subject)
        for subject in (subjects.node("tiny", 0, 3, NODE), subjects.stage(NODE)):
            await mine.subscribe(subject, queue=NODE)
        await mine.flush()
        assert await until(lambda: denied(errors, "subscription", subjects.stage(other))
                           and denied(errors, "subscription", subjects.node("tiny", 0, 3, other))), errors
        await asyncio.sleep(0.1)
        assert not [e for e in errors if NODE in e], errors  # its own subjects and key: never denied

        assert await evict(admin, other) == [other_key]  # admin evicts the ghost
        assert await registry_value(admin, other_key) is None
    finally:
        await mine.close()
        await admin.close()


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
        # each stage connects on its own, like parallax-stage: 0:3 with its per-node nkey and --node-id, 3:6 as
        # the shared stage role
        for start, end, role, node in ((0, 3, f"stage-{ADDED}", ADDED), (3, 6, "stage", f"s3-{uuid.uuid4().hex[:6]}")):
            backend = await asyncio.to_thread(TorchBackend.load, path, "tiny", start, end, "float32", "cpu")
            config = WorkerConfig(nats=options(server, auth_dir, role), node_id=node, heartbeat_s=0.2)
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
