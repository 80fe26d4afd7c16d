"""The ``parallax`` command.

    parallax up --model smollm2-135m --stages 2 --port 8000
    parallax status --nats nats://127.0.0.1:4222 [--model M] [--json]
    parallax metrics --nats nats://127.0.0.1:4222
    parallax trace REQUEST_ID --nats nats://127.0.0.1:4222
    parallax evict NODE --nats nats://127.0.0.1:4222
    parallax auth init DIR [--host NAME ...] [--stage NODE ...] [--force]
    parallax auth add-stage DIR NODE

Every command but ``auth`` takes the connection flags (``--nats URL[,URL...]``, ``--creds``, ``--nkey``,
``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--js-domain``); ``up`` passes them to its children.

``up`` runs a whole pipeline on this machine: an embedded nats-server (or ``--nats URL``), one stage
process per layer range and an OpenAI-compatible gateway, and stops all of them on Ctrl-C/SIGTERM.
``status`` prints the cluster registry (nodes, layer coverage, leader; see :mod:`parallax.status`).
``metrics`` prints every stage's Prometheus series, asked over NATS; ``trace`` a request's hops and
their times; ``evict`` deletes a ghost's record (:mod:`parallax.watch`).
``auth init`` writes an nkey per role, their subject permissions and TLS certificates (:mod:`parallax.auth`).
Exit codes as every command (:mod:`parallax.broker.errors`): 0 after a clean stop, 1 when something
fails while running (a child process exits), 2 when it cannot start (bad input, NATS unreachable).
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace

from parallax.auth import add_parser as add_auth_parser
from parallax.broker.cli import add_nats_args, fail, nats_options
from parallax.broker.connection import DEFAULT_URL, NatsOptions
from parallax.broker.errors import ParallaxError, UsageError
from parallax.stages.models import QUANTIZE_TYPES, already_quantized
from parallax.watch import add_wait, run_evict, run_metrics, run_trace

DTYPES = ("float32", "bfloat16", "float16")
WATCH_COMMANDS = {"metrics": run_metrics, "trace": run_trace, "evict": run_evict}
READY_TIMEOUT_S = 300.0
POLL_S = 0.5


class Shutdown(Exception):
    """SIGTERM arrived: stop everything like Ctrl-C does."""


@dataclass(frozen=True)
class UpPlan:
    model: str  # as given on the command line; children resolve it again (from the cache)
    served_name: str
    ranges: list[tuple[int, int]]
    dtype: str
    host: str
    port: int
    stage_args: tuple[str, ...] = ()  # extra flags for every stage
    quantize: str | None = None  # --quantize for every stage
    dequantize: bool = False  # --dequantize for every stage
    backend: str = "auto"  # --backend for every stage (checked by plan_up; auto: each stage picks, like here)
    revision: str | None = None  # an HF id's commit, downloaded by plan_up: every child serves that snapshot

    def __post_init__(self) -> None:
        if not self.ranges:
            raise ValueError("a plan needs at least one stage")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")

    @property
    def base_url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parallax", description="Pipeline-parallel LLM inference over NATS.")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="run NATS, every stage and the gateway on this machine")
    up.add_argument("--model", default="smollm2-135m", help="alias, HF folder, .gguf file or HF id")
    up.add_argument("--revision", default=None,
                    help="branch, tag or commit of an HF id (default: main); downloaded once before the stages start")
    up.add_argument("--stages", type=int, default=2, help="number of stage processes (even layer split)")
    up.add_argument("--host", default="127.0.0.1", help="gateway HTTP host")
    up.add_argument("--port", type=int, default=8000, help="gateway HTTP port")
    up.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                    help="stage activation and KV dtype (weights stay as stored)")
    up.add_argument("--quantize", choices=QUANTIZE_TYPES, default=None,
                    help="stages hold a Hugging Face checkpoint's weight matrices as GGUF blocks of this type")
    up.add_argument("--dequantize", action="store_true",
                    help="serve a GGUF model from a dense safetensors copy instead of its quantized blocks")
    up.add_argument("--backend", default="auto", metavar="{auto,torch,mlx}",
                    help="stage compute backend: auto (mlx on macOS arm64, torch elsewhere), torch or mlx")
    up.add_argument("--nats-port", type=int, default=4222, help="port of the embedded nats-server")
    up.add_argument("--nats-host", default="127.0.0.1", help="host the embedded nats-server binds")
    up.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S, help="seconds to wait for /health")
    up.add_argument("--stage-args", default="", metavar="ARGS",
                    help="extra flags for every parallax-stage, e.g. \"--max-batch-size 64 --kv-cache-memory 1\"")
    add_nats_args(up, default_url=None)  # no --nats: start an embedded server (without auth or TLS)
    status = commands.add_parser("status", help="show the cluster registry: nodes, layer coverage, leader")
    status.add_argument("--model", help="only this model's nodes and coverage")
    status.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    status.add_argument("--timeout", type=float, default=5.0, metavar="S", help="seconds to connect and read")
    add_wait(commands.add_parser("metrics", help="print every stage's Prometheus metrics, asked over NATS"))
    trace = commands.add_parser("trace", help="a request's hops and their times, asked of every stage over NATS")
    trace.add_argument("id", help="the request's id (the `id` of its response) or its W3C trace id")
    add_wait(trace)
    trace.add_argument("--spans", action="store_true", help="also print every span in time order")
    trace.add_argument("--json", action="store_true", help="print the stages' answers as JSON")
    evict = commands.add_parser("evict", help="delete a ghost's record (its heartbeat stopped) from the registry")
    evict.add_argument("node", help="the node id, as `parallax status` shows it")
    add_nats_args(evict)
    evict.add_argument("--force", action="store_true", help="also when the node still heartbeats (it comes back)")
    add_nats_args(status)
    add_auth_parser(commands)
    return parser


def _check_port(flag: str, port: int) -> None:
    if not 0 < port < 65536:
        raise UsageError(f"{flag} must be in 1..65535, got {port}")


def plan_up(args: argparse.Namespace) -> UpPlan:
    """Validate the input and resolve the model once (a GGUF is converted here, with progress)."""
    from parallax.broker.layers import even_split
    from parallax.broker.model import ModelFacts, gguf_file, resolve_model  # no torch import until a conversion
    from parallax.stages.cli import resolve_backend
    from parallax.stages.models import architecture

    _check_port("--port", args.port)
    _check_port("--nats-port", args.nats_port)
    if args.stages < 1:
        raise UsageError(f"--stages must be at least 1, got {args.stages}")
    if args.ready_timeout <= 0:
        raise UsageError("--ready-timeout must be positive")
    resolve_backend(args.backend)  # an unknown or uninstalled backend: exit 2 before anything starts
    # ModelNotFound is a UsageError: exit 2. An HF id is downloaded here, whole (every stage runs here),
    # after its config.json names an architecture the stages serve.
    source = resolve_model(args.model, dequantize=args.dequantize, revision=args.revision, check=architecture)
    if args.quantize and (file := gguf_file(source.path)) is not None:
        raise already_quantized(file.name)
    try:
        ranges = even_split(ModelFacts.read(source.path).num_layers, args.stages)
    except ValueError as exc:
        raise UsageError(f"--stages {args.stages}: {exc}") from None
    commit = source.path.name if source.hub_id is not None else None
    return UpPlan(args.model, source.name, ranges, args.dtype, args.host, args.port, tuple(shlex.split(args.stage_args)),
                  args.quantize, args.dequantize, args.backend, commit)


def stage_command(plan: UpPlan, start: int, end: int, nats: NatsOptions) -> list[str]:
    flags = (["--quantize", plan.quantize] if plan.quantize else []) + (["--dequantize"] if plan.dequantize else [])
    flags += [] if plan.backend == "auto" else ["--backend", plan.backend]
    flags += [] if plan.revision is None else ["--revision", plan.revision]
    return [sys.executable, "-m", "parallax.stages.cli", "--model", plan.model, "--layers", f"{start}:{end}",
            *nats.cli_args(), "--dtype", plan.dtype, *flags, *plan.stage_args]


def gateway_command(plan: UpPlan, nats: NatsOptions) -> list[str]:
    revision = [] if plan.revision is None else ["--revision", plan.revision]
    return [sys.executable, "-m", "parallax.gateway.cli", "--model", plan.model, *nats.cli_args(),
            "--host", plan.host, "--port", str(plan.port), *revision]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_ready(plan: UpPlan, group, timeout: float) -> None:
    """Until GET /health answers 200; ParallaxError if a child exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_children(group)
        if healthy(f"{plan.base_url}/health"):
            return
        time.sleep(POLL_S)
    raise ParallaxError(f"gateway not healthy at {plan.base_url}/health after {timeout:.0f} s")


def _check_children(group) -> None:
    child = group.exited()
    if child is not None:
        raise ParallaxError(f"{child.name} (pid {child.pid}) exited with code {child.returncode}; see its output above")


def _banner(plan: UpPlan, nats_url: str) -> str:
    ranges = " ".join(f"{a}:{b}" for a, b in plan.ranges)
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "Hello!"}], "stream": true}'
            % plan.served_name)
    return (
        f"parallax: serving {plan.served_name} at {plan.base_url}/v1 "
        f"({len(plan.ranges)} stages: {ranges}; NATS {nats_url})\n"
        f"  curl -N {plan.base_url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'\n"
        "  Ctrl-C stops everything."
    )


def _raise_shutdown(signum, frame) -> None:
    raise Shutdown()


def _say(line: str) -> None:
    print(f"parallax: {line}", file=sys.stderr, flush=True)


def run_up(args: argparse.Namespace) -> int:
    from parallax.procs import ProcessGroup

    nats = nats_options(args, args.nats or DEFAULT_URL)  # bad connection flags: exit 2 before anything starts
    plan = plan_up(args)
    server = None
    group = ProcessGroup()
    try:
        if not args.nats:
            server = _start_server(args.nats_host, args.nats_port)
            nats = replace(nats, servers=(server.url,))
        for start, end in plan.ranges:
            group.spawn(f"stage {start}:{end}", stage_command(plan, start, end, nats))
        group.spawn("gateway", gateway_command(plan, nats))
        _say(f"waiting for the gateway at {plan.base_url}/health ...")
        wait_ready(plan, group, args.ready_timeout)
        print(_banner(plan, nats.url), flush=True)
        while True:
            _check_children(group)
            time.sleep(POLL_S)
    except (KeyboardInterrupt, Shutdown):
        _say("stopping...")
        return 0
    finally:
        _ignore_signals()
        group.stop_all()
        if server is not None:
            server.stop()


def _start_server(host: str, port: int):
    from parallax.broker.server import EmbeddedServer, NatsServerError, ServerConfig

    try:
        return EmbeddedServer(ServerConfig(port=port, host=host)).start()
    except NatsServerError as exc:
        raise NatsServerError(f"{exc} (choose another --nats-port, or reuse a server with --nats URL)") from None


def _ignore_signals() -> None:
    """A second Ctrl-C must not interrupt the cleanup (children also die with us via PDEATHSIG)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _raise_shutdown)
    # a shell starts background jobs with SIGINT ignored; `kill -INT` must still stop us cleanly
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if args.command == "status":
            from parallax.status import run_status

            return run_status(args)
        if args.command in WATCH_COMMANDS:
            return WATCH_COMMANDS[args.command](args)
        if args.command == "auth":
            from parallax.auth import run_auth

            return run_auth(args)
        return run_up(args)
    except ParallaxError as exc:
        return fail("parallax", exc)
    except (KeyboardInterrupt, Shutdown):
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
