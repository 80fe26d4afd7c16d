"""``parallax auth init DIR``: what a NATS cluster with authenticated roles and TLS needs.

    DIR/<role>.nk                       the role's nkey seed (0600): ``--nkey DIR/stage.nk``
    DIR/stage-<NODE>.nk                 one stage node's own seed (0600), from ``--stage NODE`` or ``auth add-stage``:
                                        ``--nkey DIR/stage-<NODE>.nk --node-id NODE``
    DIR/auth.conf                       ``authorization { users = [...] }``: each role's public nkey and
                                        subject permissions (``include`` it in nats-server's config)
    DIR/leaf-seed.conf                  the leaf role's seed as a config variable (0600), for a leaf site's
                                        ``remotes [{ nkey: $PARALLAX_LEAF_SEED }]``
    DIR/tls.conf, DIR/mtls.conf         the client listener's ``tls { }`` block: server certificate only, or
                                        also requiring a client certificate signed by the CA (mutual TLS)
    DIR/ca.pem                          the CA every process trusts: ``--tls-ca DIR/ca.pem``
    DIR/server-cert.pem, -key.pem       the servers' certificate (client listener, cluster routes, leaf links)
    DIR/<role>-cert.pem, -key.pem       a client certificate per role, for mutual TLS (``--tls-cert/--tls-key``)
                                        (certificates: :mod:`parallax.certs`)

Roles (:data:`ROLES`): ``stage``, ``gateway``, ``scheduler``, ``admin`` (the ``nats`` CLI) and ``leaf`` (the
link of a leaf site's server to the hub). Permissions follow the data flow (:func:`permissions`). Private
keys and seeds are written 0600; the directory 0700.

Per-node stages (the secure choice): ``parallax auth init DIR --stage NODE ...`` names stage nodes up front and
``parallax auth add-stage DIR NODE`` adds one later. Each gets its own nkey, allowed to write only its registry
key ``stage.<NODE>``, receive only its own layer subjects and answer only its own ``parallax.stage.<NODE>``
(:func:`stage_permissions`), so only it and admin can change or delete that key (``parallax evict``). auth.conf
is always rendered from the seeds in DIR (:func:`write_auth_conf`): after ``add-stage``, copy it to every
nats-server and reload them. The shared ``stage`` role stays for clusters that do not name their nodes.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from parallax.broker import subjects
from parallax.broker.errors import UsageError
from parallax.broker.kv import NODES_BUCKET
from parallax.broker.registry import LEADER_KEY, assign_key, node_key
from parallax.stages.micro import SERVICE as STAGE_SERVICE

NODE_SEED = "stage-{}.nk"  # a per-node stage's seed file in DIR

ROLES = ("stage", "gateway", "scheduler", "admin", "leaf")
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")  # always in the server certificate

P = subjects.PREFIX
_STREAM = f"KV_{NODES_BUCKET}"
_KV = f"$KV.{NODES_BUCKET}"
LAYERS = f"{P}.*.layers.>"  # subjects.node(): parallax.<model>.layers.<a>-<b>.<node>
NODE_LAYERS = f"{P}.*.layers.*.{{}}"  # one node's layer subjects (any model, any range)
RELEASE = f"{P}.*.release"  # subjects.release()
GATEWAYS = f"{P}.gateway.*"  # subjects.gateway(): every gateway's replies
STAGES = f"{P}.stage.*"  # subjects.stage(): a stage's nats.micro endpoint
# Answers a stage connection may send to one request: one per worker on it (two while it moves to another
# range). With a limit of 1, nats-server 2.15 denied both answers of a connection subscribed twice.
STAGE_ANSWERS = 4


def _js_api(*suffixes: str) -> list[str]:
    """JetStream API subjects, for the local domain (``$JS.API.``) and a named one (``$JS.<domain>.API.``)."""
    return [f"{prefix}.{s}" for s in suffixes for prefix in ("$JS.API", "$JS.*.API")]


# What every service role needs of the registry bucket: find it (or create it when first up: account INFO
# first), read keys (direct get), list and watch them (ordered consumers: create, info, delete when the
# watch stops, flow-control replies). Acks and deliveries come to the connection's _INBOX.
REGISTRY_READ = _js_api(
    "INFO", f"STREAM.INFO.{_STREAM}", f"STREAM.CREATE.{_STREAM}", f"STREAM.MSG.GET.{_STREAM}",
    f"DIRECT.GET.{_STREAM}", f"DIRECT.GET.{_STREAM}.>",
    f"CONSUMER.CREATE.{_STREAM}", f"CONSUMER.CREATE.{_STREAM}.>", f"CONSUMER.INFO.{_STREAM}.*", f"CONSUMER.DELETE.{_STREAM}.*",
) + [f"$JS.FC.{_STREAM}.>"]


def _kv_write(*keys: str) -> list[str]:
    """Writes (puts, deletes) of registry keys, direct and through a leaf (``$JS.<domain>.API.$KV...``)."""
    return [f"{prefix}{_KV}.{key}" for key in keys for prefix in ("", "$JS.*.API.")]


def _srv(service: str) -> list[str]:
    """The nats.micro discovery subjects a service answers ($SRV.PING, $SRV.INFO.<name>, ...)."""
    return [f"$SRV.{verb}{tail}" for verb in ("PING", "INFO", "STATS") for tail in ("", f".{service}", f".{service}.*")]


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    # may answer requests it received (publish to their reply subject) this many times each; 0: only
    # what ``publish`` allows. The server counts every subscription of a connection that got the request.
    allow_responses: int = 0

    def render(self) -> dict:
        out: dict = {"publish": {"allow": list(self.publish)}, "subscribe": {"allow": list(self.subscribe)}}
        if self.allow_responses:
            out["allow_responses"] = {"max": self.allow_responses}
        return out


def stage_permissions(node: str | None = None) -> Permissions:
    """A stage's permissions: the shared ``stage`` role (``node`` None), or one named node's, which may
    receive only its own layer subjects (``parallax.*.layers.*.<node>``), answer only its own
    ``parallax.stage.<node>`` and write only ``stage.<node>`` (direct and through a JetStream domain)."""
    layers, endpoint = (LAYERS, STAGES) if node is None else (NODE_LAYERS.format(node), subjects.stage(node))
    return Permissions(
        publish=(LAYERS, GATEWAYS, RELEASE, *REGISTRY_READ, *_kv_write(node_key("stage", node or "*"))),
        subscribe=(layers, RELEASE, subjects.STATS, subjects.METRICS, subjects.TRACE, endpoint, *_srv(STAGE_SERVICE),
                   "_INBOX.>"),
        allow_responses=STAGE_ANSWERS,
    )


def permissions(role: str) -> Permissions:
    """Subject permissions of a role.

    - stage: receives work for layer subjects and the release broadcast, answers ``parallax.stats``,
      ``parallax.metrics``, ``parallax.trace``,
      ``parallax.stage.<node>`` and ``$SRV`` requests (only the requests it got: ``allow_responses``,
      :data:`STAGE_ANSWERS` answers each); publishes to layer
      subjects, gateway replies and the release broadcast; writes ``stage.*`` registry keys. One
      stage user serves every stage, so the key is ``stage.*`` (any stage's) and the layer
      subjects are every node's: a per-node user (:func:`stage_permissions`) is pinned to one.
    - gateway: receives on gateway reply subjects; sends work and releases, asks ``parallax.metrics``
      (its ``/metrics?cluster=1``) and ``parallax.stage.<node>`` (after a reconnect: is the stage back?);
      writes ``gateway.*``.
    - scheduler: writes ``scheduler.*``, ``assign.*`` and ``leader``; sends nothing else.
    - admin: everything (``nats`` CLI, ``parallax status``, benchmarks' ``parallax.stats`` requests).
    - leaf: everything, for a leaf site's server link (what crosses it is limited by the users at each end).
    """
    inbox = ("_INBOX.>",)
    if role == "stage":
        return stage_permissions()
    if role == "gateway":
        return Permissions(publish=(LAYERS, RELEASE, subjects.METRICS, STAGES, *REGISTRY_READ,
                                    *_kv_write(node_key("gateway", "*"))),
                           subscribe=(GATEWAYS, *inbox))
    if role == "scheduler":
        keys = (node_key("scheduler", "*"), assign_key("*"), LEADER_KEY)
        return Permissions(publish=(*REGISTRY_READ, *_kv_write(*keys)), subscribe=inbox)
    if role in ("admin", "leaf"):
        return Permissions(publish=(">",), subscribe=(">",))
    raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")


def check_node_id(node: str) -> str:
    """A stage node id that a per-node credential can name: one registry key token and one subject token,
    the same in both (``stage.<node>``, ``parallax.stage.<node>``): letters, digits, ``-`` and ``_``."""
    try:
        same = subjects.token(node) == node  # token()'s characters are a subset of the KV key characters
    except ValueError:
        same = False
    if not same:
        raise UsageError(f"stage node id must be letters, digits, '-' and '_' (no '_' first or last), got {node!r}")
    return node


@dataclass(frozen=True)
class AuthPlan:
    """What ``auth init`` writes: the folder, the extra names of the server certificate and the stage
    nodes that get their own nkey."""

    directory: Path
    hosts: tuple[str, ...] = ()
    force: bool = False
    stages: tuple[str, ...] = ()
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        for node in self.stages:
            check_node_id(node)
        if twice := sorted({node for node in self.stages if self.stages.count(node) > 1}):
            raise UsageError(f"--stage {twice[0]} is given twice")
        names = list(LOCAL_NAMES)
        for host in self.hosts:
            host = host.strip()
            if not host or any(c in host for c in " /,"):
                raise UsageError(f"--host must be a DNS name or an IP address, got {host!r}")
            if host not in names:
                names.append(host)
        object.__setattr__(self, "names", tuple(names))
        object.__setattr__(self, "directory", Path(self.directory).expanduser().absolute())


def init(plan: AuthPlan) -> list[Path]:
    """Write everything into ``plan.directory`` (refused when it exists and is not empty, unless
    ``force``); returns the files written."""
    _prepare(plan.directory, plan.force)
    for old in plan.directory.glob(NODE_SEED.format("*")):  # --force: the nodes named now, no others
        old.unlink()
    written = [_write(plan.directory / f"{role}.nk", new_seed(), private=True) for role in ROLES]
    written += [_write(plan.directory / NODE_SEED.format(node), new_seed(), private=True) for node in plan.stages]
    written.append(write_auth_conf(plan.directory))
    written.append(_write(plan.directory / "leaf-seed.conf", render_leaf_seed(plan.directory / "leaf.nk"), private=True))
    from parallax.certs import pem_files

    for name, data in pem_files(plan.names, ROLES).items():
        written.append(_write(plan.directory / name, data, private=name.endswith("-key.pem")))
    written.append(_write(plan.directory / "tls.conf", render_tls_conf(plan.directory, verify=False)))
    written.append(_write(plan.directory / "mtls.conf", render_tls_conf(plan.directory, verify=True)))
    return written


def add_stage(directory: Path, node: str) -> Path:
    """Give stage ``node`` its own nkey in an ``auth init`` folder and rewrite auth.conf; the seed file."""
    check_node_id(node)
    directory = Path(directory).expanduser().absolute()
    missing = [role for role in ROLES if not (directory / f"{role}.nk").is_file()]
    if missing:
        raise UsageError(f"{directory} has no {missing[0]}.nk: run `parallax auth init {directory}` first")
    seed = directory / NODE_SEED.format(node)
    if seed.exists():
        raise UsageError(f"stage {node!r} already has a key ({seed}); delete that file first to replace it")
    _write(seed, new_seed(), private=True)
    write_auth_conf(directory)
    return seed


def stage_nodes(directory: Path) -> list[str]:
    """The stage nodes with their own seed in ``directory`` (``stage-<NODE>.nk``), sorted."""
    prefix, suffix = NODE_SEED.split("{}")
    return sorted(check_node_id(p.name[len(prefix):-len(suffix)]) for p in directory.glob(NODE_SEED.format("*")))


def write_auth_conf(directory: Path) -> Path:
    """(Re)write ``directory/auth.conf`` from the seeds in it: every role, then every per-node stage."""
    users = [(role, public_key(directory / f"{role}.nk"), permissions(role)) for role in ROLES]
    users += [(f"stage {node}", public_key(directory / NODE_SEED.format(node)), stage_permissions(node))
              for node in stage_nodes(directory)]
    return _write(directory / "auth.conf", render_auth_conf(users))


def _prepare(directory: Path, force: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise UsageError(f"{directory} exists and is not empty; pass --force to replace its keys and certificates")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)


def _write(path: Path, data: str | bytes, private: bool = False) -> Path:
    """Write ``path`` whole; private files are created 0600 (never readable by others, not even briefly)."""
    raw = data.encode() if isinstance(data, str) else data
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    return path


# --- nkeys -----------------------------------------------------------------------------------------
def new_seed() -> bytes:
    """A new user nkey seed (``SU...``)."""
    import nkeys

    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER) + b"\n"


def public_key(seed_file: Path) -> str:
    """The public nkey (``U...``) of a seed file."""
    import nkeys

    return nkeys.from_seed(bytearray(seed_file.read_bytes().strip())).public_key.decode()


def render_auth_conf(users: list[tuple[str, str, Permissions]]) -> str:
    """The ``authorization`` block: one nkey user per (comment, public key, permissions)."""
    blocks = []
    for comment, key, allowed in users:
        user = json.dumps({"nkey": key, "permissions": allowed.render()}, indent=2)
        blocks.append(f"    # {comment}\n" + "\n".join("    " + line for line in user.splitlines()))
    return ("# Parallax-NATS roles (parallax auth init). include this file in the nats-server config:\n"
            "#   include ./auth/auth.conf      (a path relative to the including file)\n"
            "# A connection without one of these nkeys is refused.\n"
            "authorization {\n  users = [\n" + ",\n".join(blocks) + "\n  ]\n}\n")


def render_leaf_seed(seed_file: Path) -> str:
    """nats-server takes a leaf remote's nkey as an inline seed: this variable keeps it out of the site's config."""
    seed = seed_file.read_text().strip()
    return ("# The leaf role's seed (secret). A leaf site's config: include auth/leaf-seed.conf, then\n"
            "#   leafnodes { remotes [{ url: \"tls://hub:7422\", nkey: $PARALLAX_LEAF_SEED, tls { ... } }] }\n"
            f"PARALLAX_LEAF_SEED: {json.dumps(seed)}\n")


def render_tls_conf(directory: Path, verify: bool) -> str:
    note = ("# Mutual TLS: clients must also present a certificate signed by ca.pem (--tls-cert/--tls-key)."
            if verify else "# TLS on the client listener; clients verify the server with --tls-ca ca.pem.")
    return (f"{note}\n# include it in the nats-server config (top level, next to listen:).\ntls {{\n"
            f"  cert_file: {json.dumps(str(directory / 'server-cert.pem'))}\n"
            f"  key_file: {json.dumps(str(directory / 'server-key.pem'))}\n"
            f"  ca_file: {json.dumps(str(directory / 'ca.pem'))}\n"
            f"  verify: {'true' if verify else 'false'}\n  timeout: 5\n}}\n")


# --- the command -----------------------------------------------------------------------------------
def add_parser(commands) -> None:
    auth = commands.add_parser("auth", help="credentials and certificates for a secured NATS cluster")
    actions = auth.add_subparsers(dest="auth_command", required=True)
    init_cmd = actions.add_parser("init", help="write an nkey per role, their permissions and a CA + certificates")
    init_cmd.add_argument("directory", metavar="DIR", help="folder to create (e.g. /etc/parallax/auth)")
    init_cmd.add_argument("--host", action="append", default=[], metavar="NAME",
                          help="a DNS name or IP of the NATS servers for the server certificate (repeatable; "
                               "localhost and 127.0.0.1 are always in)")
    init_cmd.add_argument("--force", action="store_true", help="replace the keys and certificates in an existing DIR")
    init_cmd.add_argument("--stage", action="append", default=[], metavar="NODE",
                          help="also an nkey for stage NODE alone (stage-NODE.nk: writes only its own registry key; "
                               "run it with --node-id NODE); repeatable; the secure choice over the shared stage.nk")
    add_cmd = actions.add_parser("add-stage", help="give one more stage node its own nkey and rewrite auth.conf")
    add_cmd.add_argument("directory", metavar="DIR", help="a folder written by `parallax auth init`")
    add_cmd.add_argument("node", metavar="NODE", help="the stage's --node-id (letters, digits, '-', '_')")


def run_auth(args: argparse.Namespace) -> int:
    if args.auth_command == "add-stage":
        return _run_add_stage(Path(args.directory), args.node)
    plan = AuthPlan(Path(args.directory), tuple(args.host), args.force, tuple(args.stage))
    try:
        written = init(plan)
    except OSError as e:
        raise UsageError(f"cannot write {plan.directory}: {e.strerror or e}") from None
    print(f"parallax: wrote {len(written)} files to {plan.directory}")
    print(f"  nats-server:  include {plan.directory.name}/auth.conf and {plan.directory.name}/tls.conf (or mtls.conf); "
          "include paths are relative to the including config file")
    for node in plan.stages:
        print(f"  stage {node}: --nkey {plan.directory / NODE_SEED.format(node)} --node-id {node}")
    print(f"  a stage:      --nkey {plan.directory / 'stage.nk'} --tls-ca {plan.directory / 'ca.pem'}"
          f"{'  (shared by every stage: prefer --stage NODE)' if not plan.stages else ''}")
    print(f"  nats CLI:     nats --nkey {plan.directory / 'admin.nk'} --tlsca {plan.directory / 'ca.pem'} ...")
    print(f"  server names: {', '.join(plan.names)}")
    return 0



def _run_add_stage(directory: Path, node: str) -> int:
    try:
        seed = add_stage(directory, node)
    except OSError as e:
        raise UsageError(f"cannot write {directory}: {e.strerror or e}") from None
    print(f"parallax: wrote {seed} and {seed.parent / 'auth.conf'}")
    print(f"  the stage:    --nkey {seed} --node-id {node} --tls-ca {seed.parent / 'ca.pem'}")
    print("  nats-server:  copy auth.conf to every server and reload it (nats-server --signal reload)")
    return 0
