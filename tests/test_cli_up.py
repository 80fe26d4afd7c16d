"""`parallax up` and the process helpers it stands on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from parallax.broker.connection import NatsOptions
from parallax.broker.server import free_port

import parallax.cli as cli
from parallax.procs import ProcessGroup, pid_alive, spawn
from tests.processes import child_dies_with_parent, wait_gone

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]
STUBBORN = [sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(60)"]


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


@pytest.fixture
def config_only_model(tmp_path) -> Path:
    """Enough of a model for `up` to plan (config.json); nothing can load it."""
    folder = tmp_path / "two-layers"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "model_type": "llama"}))
    return folder


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parallax.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------- procs


def test_stop_all_terminates_every_child():
    group = ProcessGroup()
    children = [group.spawn(f"sleep-{i}", SLEEP) for i in range(3)]
    assert group.exited() is None and all(pid_alive(c.pid) for c in children)
    group.stop_all()
    assert not any(pid_alive(pid) for pid in group.pids)


def test_stop_all_kills_a_child_that_ignores_sigterm():
    with ProcessGroup() as group:
        child = group.spawn("stubborn", STUBBORN, stdout=subprocess.PIPE, text=True)
        assert child.proc.stdout.readline().strip() == "ready"
        started = time.monotonic()
        group.stop_all(grace=0.5)
        assert time.monotonic() - started < 5
        assert child.returncode == -signal.SIGKILL
    assert not pid_alive(child.pid)


def test_exited_names_the_first_dead_child():
    with ProcessGroup() as group:
        group.spawn("sleeper", SLEEP)
        dead = group.spawn("quitter", [sys.executable, "-c", "raise SystemExit(3)"])
        dead.proc.wait(30)
        assert group.exited() is dead and dead.returncode == 3


def test_children_die_with_their_parent():
    code = ("import sys, time\nfrom parallax.procs import spawn\n"
            f"c = spawn('sleep', {SLEEP!r})\nprint(c.pid, flush=True)\ntime.sleep(60)\n")
    assert child_dies_with_parent(code), "child outlived its parent"


def test_spawn_rejects_an_empty_command():
    with pytest.raises(ValueError, match="empty command for child 'nothing'"):
        spawn("nothing", [])


# ----------------------------------------------------------------------------- bad input: exit 2


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("parallax: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_model_exits_2(tmp_path):
    assert_one_line_error(run_cli("up", "--model", str(tmp_path / "missing")), 2, "does not exist")


def test_uncached_hf_id_exits_2():
    env_id = "parallax-test-org/definitely-not-cached-model"
    assert_one_line_error(run_cli("up", "--model", env_id), 2, "not in the local Hugging Face cache")


@pytest.mark.parametrize("stages, fragment", [("0", "at least 1"), ("3", "cannot split 2 layers into 3")])
def test_bad_stage_count_exits_2(config_only_model, stages, fragment):
    assert_one_line_error(run_cli("up", "--model", str(config_only_model), "--stages", stages), 2, fragment)


def test_bad_port_exits_2(config_only_model):
    assert_one_line_error(run_cli("up", "--model", str(config_only_model), "--port", "70000"), 2, "--port")


def test_nats_port_in_use_exits_2(config_only_model, nats_server):
    result = run_cli("up", "--model", str(config_only_model), "--stages", "1",
                     "--nats-port", str(nats_server.config.port), "--port", str(free_port()))
    assert_one_line_error(result, 2, "already in use", "--nats-port")


def test_commands_for_children(config_only_model):
    args = cli.build_parser().parse_args(["up", "--model", str(config_only_model), "--stages", "2",
                                          "--dtype", "float32", "--port", "8123"])
    plan = cli.plan_up(args)
    assert plan.ranges == [(0, 1), (1, 2)] and plan.served_name == "two-layers"
    assert cli.stage_command(plan, 1, 2, NatsOptions("nats://h:1"))[1:] == [
        "-m", "parallax.stages.cli", "--model", str(config_only_model), "--layers", "1:2",
        "--nats", "nats://h:1", "--dtype", "float32"]
    assert cli.gateway_command(plan, NatsOptions("nats://h:1"))[1:] == [
        "-m", "parallax.gateway.cli", "--model", str(config_only_model), "--nats", "nats://h:1",
        "--host", "127.0.0.1", "--port", "8123"]


@pytest.mark.usefixtures("sigint_default")
def test_child_exiting_early_stops_everything(config_only_model, monkeypatch, capsys):
    """A stage that dies before /health is up: every child is stopped and the exit code is 1."""
    spawned: list[ProcessGroup] = []
    real_group = ProcessGroup

    def recording_group():
        group = real_group()
        spawned.append(group)
        return group

    monkeypatch.setattr("parallax.procs.ProcessGroup", recording_group)
    monkeypatch.setattr(cli, "stage_command", lambda *a: [sys.executable, "-c", "raise SystemExit(3)"])
    monkeypatch.setattr(cli, "gateway_command", lambda *a: SLEEP)
    code = cli.main(["up", "--model", str(config_only_model), "--stages", "2",
                     "--nats-port", str(free_port()), "--port", str(free_port()), "--ready-timeout", "30"])
    assert code == 1
    err = capsys.readouterr().err
    assert "exited with code 3" in err and "Traceback" not in err
    assert spawned and not any(pid_alive(pid) for pid in spawned[0].pids)
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # handlers restored


# ----------------------------------------------------------------------------- the real thing


@pytest.mark.slow
def test_up_serves_and_stops_every_child_on_sigint(tiny_model_dir, tmp_path):
    port, log = free_port(), open(tmp_path / "up.log", "w")
    up = subprocess.Popen(
        [sys.executable, "-m", "parallax.cli", "up", "--model", str(tiny_model_dir), "--stages", "2",
         "--port", str(port), "--nats-port", str(free_port()), "--dtype", "float32"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("parallax up never became healthy:\n" + (tmp_path / "up.log").read_text()[-3000:])
        children = children_of(up.pid)
        assert len(children) == 4, children  # nats-server, 2 stages, gateway
        reply = httpx.post(f"{base}/v1/completions", timeout=120,
                           json={"model": tiny_model_dir.name, "prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert reply.status_code == 200, reply.text
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
        for pid in children:
            assert wait_gone(pid, 5), f"child {pid} still running"
        assert "Traceback" not in (tmp_path / "up.log").read_text().split("stopping...")[0]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        log.close()
