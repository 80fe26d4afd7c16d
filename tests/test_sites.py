"""How processes connect (NatsOptions and the shared flags, TLS and nkeys against a real server), and
the sites of issue 13: a hub and a leaf-node site with their own JetStream domains, and a 3-server
cluster with a replicated registry."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
from pathlib import Path

import nats
import pytest

from parallax.broker.cli import add_nats_args, nats_options
from parallax.broker.connection import DEFAULT_URL, NatsOptions, connect
from parallax.broker.errors import NatsUnreachable, UsageError

from .conftest import start_nats_server


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
    server = start_nats_server(jetstream=False, extra_args=("-c", str(conf)))
    try:
        yield server, tls, seed
    finally:
        server.stop()


async def test_connect_uses_tls_and_nkey_and_a_refusal_ends_at_once(secure_server):
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


def test_parallax_commands_take_the_flags_and_up_passes_them_on(tmp_path, capsys):
    import parallax.cli as cli

    assert cli.main(["status", "--nats", "nats://127.0.0.1:1", "--creds", str(tmp_path / "none.creds")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"parallax: error: --creds {tmp_path}/none.creds: no such file"]
    plan = cli.UpPlan("m", "m", [(0, 2)], "float32", "127.0.0.1", 8000)
    options = NatsOptions("nats://a:1,nats://b:2", js_domain="hub")
    for command in (cli.stage_command(plan, 0, 2, options), cli.gateway_command(plan, options)):
        assert command[command.index("--nats"):][:4] == ["--nats", "nats://a:1,nats://b:2", "--js-domain", "hub"]
