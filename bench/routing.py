"""Load-aware routing against round-robin, on a cluster with one slow replica.

    python -m bench.routing                        # SmolLM2, 0:15 x1 + 15:30 x2 (one slowed by 60 ms/step)
    python -m bench.routing --delay-ms 120 --requests 64 --output-len 64

Starts its own nats-server and three ``parallax-stage`` processes: the first half of the layers
once, the second half twice, one of those two with ``--debug-delay-ms`` (it sleeps that long after
every engine step: a slow node on purpose). Then, for each policy, a ``parallax-gateway --routing
POLICY`` (restarted between policies; the stages stay), a warm-up, and ``--requests`` streamed
requests with ``--concurrency`` in flight, the same seeded prompts for every policy (the stages run
with ``--no-prefix-cache``, so the second policy gains nothing from the first). Prints a markdown
table and writes ``--out`` (``bench/results/routing.json``). Every process is stopped by PID at the
end, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import report
from bench.client import make_http_client, run_requests
from bench.cluster import ClusterError, distinct_free_ports, log_tail, reap, wait_healthy
from bench.natsstats import stats_client
from bench.prompts import build_prompts, tokenizer_encoder
from bench.serve import run_interruptible, say
from bench.stats import summarize_level
from parallax.broker.server import EmbeddedServer, ServerConfig
from parallax.procs import ProcessGroup

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "routing.json"
POLICIES = ("round-robin", "load")
HEAD, FAST, SLOW = "head", "fast", "slow"  # node ids of the stages
READY_TIMEOUT_S = 300.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--split", type=int, default=None, help="first layer of the replicated range (default: half)")
    p.add_argument("--delay-ms", type=float, default=250.0, help="--debug-delay-ms of the slow replica")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated, run in this order")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=32, help="measured requests per policy")
    p.add_argument("--warmup", type=int, default=4, help="warm-up requests per policy (all at once, not measured)")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=32, help="new tokens per request (ignore_eos)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage-threads", type=int, default=1, help="torch threads per stage process")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per policy before unfinished requests fail")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (logs go next to it)")
    return p


def stage_command(args: argparse.Namespace, nats_url: str, node_id: str, layers: str, delay_ms: float = 0.0) -> list[str]:
    cmd = [sys.executable, "-m", "parallax.stages.cli", "--model", args.model, "--layers", layers, "--nats", nats_url,
           "--dtype", args.dtype, "--node-id", node_id, "--kv-cache-memory", "0.25", "--no-prefix-cache",
           "--threads", str(args.stage_threads), "--log-level", "WARNING"]
    return cmd + (["--debug-delay-ms", str(delay_ms)] if delay_ms else [])


def gateway_command(args: argparse.Namespace, nats_url: str, port: int, policy: str) -> list[str]:
    return [sys.executable, "-m", "parallax.gateway.cli", "--model", args.model, "--nats", nats_url, "--port", str(port),
            "--routing", policy, "--log-level", "WARNING"]


async def wait_stages(nats_url: str, group: ProcessGroup, log_dir: Path, expected: int) -> None:
    """Until every stage answers ``parallax.stats`` (it serves then), or one of them exits."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with stats_client(nats_url, expected) as stats:
        while time.monotonic() < deadline:
            child = group.exited()
            if child is not None:
                raise ClusterError(f"stage {child.name} exited with code {child.returncode}:\n"
                                   f"{log_tail(log_dir / f'stage-{child.name}.log')}")
            if len({r.get('node_id') for r in await stats.collect()}) >= expected:
                return
            await asyncio.sleep(0.5)
    raise ClusterError(f"the stages did not all answer within {READY_TIMEOUT_S:.0f} s (logs in {log_dir})")


async def measure(args: argparse.Namespace, url: str, nats_url: str, policy: str, warmup: list[list[int]],
                  prompts: list[list[int]]) -> dict[str, Any]:
    async with stats_client(nats_url, 3) as stats:
        async with make_http_client(url, args.concurrency) as http:
            if warmup:
                done, _ = await run_requests(http, None, warmup, args.output_len, len(warmup), args.timeout)
                failed = [r.error for r in done if not r.ok]
                if failed:
                    raise ClusterError(f"warm-up failed under {policy}: {failed[0]}")
            await stats.reset()
            records, wall = await run_requests(http, None, prompts, args.output_len, args.concurrency, args.timeout)
            replies = await stats.collect()
    summary = summarize_level(records, args.concurrency, wall)
    return {"policy": policy, **summary, "stages": stage_rows(replies), "slow_share": slow_share(replies)}


def stage_rows(replies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("node_id", "start", "end", "steps", "rows", "busy_s")
    return sorted(({k: r.get(k) for k in keep} for r in replies), key=lambda r: (r["start"] or 0, str(r["node_id"])))


def slow_share(replies: Sequence[dict[str, Any]]) -> float | None:
    """Rows the slow replica ran / rows both replicas ran (prefill and decode rows)."""
    rows = {r.get("node_id"): r.get("rows") or 0 for r in replies}
    total = rows.get(SLOW, 0) + rows.get(FAST, 0)
    return rows.get(SLOW, 0) / total if total else None


def markdown(runs: Sequence[dict[str, Any]]) -> str:
    fmt = report.fmt
    headers = ("policy", "ok", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "req/s",
               "slow replica share")
    rows = [[r["policy"], f"{r['completed']}/{r['requests']}", fmt(r["output_tok_s"]), fmt(r["ttft_ms"]["p50"], 0),
             fmt(r["ttft_ms"]["p99"], 0), fmt(r["itl_ms"]["p50"]), fmt(r["itl_ms"]["p99"]), fmt(r["req_s"], 2),
             report.pct(r["slow_share"])] for r in runs]
    return report.table(headers, rows)


def run(args: argparse.Namespace, policies: list[str], results: dict[str, Any]) -> None:
    from parallax.broker.model import read_config, resolve_model

    source = resolve_model(args.model)
    num_layers = read_config(source.path)["num_hidden_layers"]
    split = args.split if args.split is not None else num_layers // 2
    if not 0 < split < num_layers:
        raise SystemExit(f"bench: --split must be in 1..{num_layers - 1}")
    encode = tokenizer_encoder(str(source.path))
    prompt_set = build_prompts(encode, args.seed, args.input_len, [args.requests], prefix_len=0, memory_requests=0,
                               warmup_requests=args.warmup)
    log_dir = args.out.parent / "routing-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    server = EmbeddedServer(ServerConfig(port=distinct_free_ports(1)[0]))
    stages = ProcessGroup()
    gateways: list[ProcessGroup] = []
    logs = []
    try:
        server.start()
        results["pids"] = {"nats-server": server.pid}
        layout = [(HEAD, f"0:{split}", 0.0), (FAST, f"{split}:{num_layers}", 0.0), (SLOW, f"{split}:{num_layers}", args.delay_ms)]
        for node_id, layers, delay in layout:
            log = open(log_dir / f"stage-{node_id}.log", "wb")
            logs.append(log)
            stages.spawn(node_id, stage_command(args, server.url, node_id, layers, delay), stdout=log, stderr=subprocess.STDOUT)
        results["pids"]["stages"] = stages.pids
        say(f"nats-server {server.url}; stages {HEAD} 0:{split}, {FAST} and {SLOW} (+{args.delay_ms:g} ms/step) "
            f"{split}:{num_layers}, {args.dtype}; logs in {log_dir}")
        run_interruptible(wait_stages(server.url, stages, log_dir, len(layout)))
        for policy in policies:
            port = distinct_free_ports(1)[0]
            url = f"http://127.0.0.1:{port}"
            group = ProcessGroup()
            gateways.append(group)
            log_path = log_dir / f"gateway-{policy}.log"
            log = open(log_path, "wb")
            logs.append(log)
            group.spawn(f"gateway {policy}", gateway_command(args, server.url, port, policy), stdout=log, stderr=subprocess.STDOUT)
            results["pids"].setdefault("gateways", []).extend(group.pids)
            wait_healthy(url, group, READY_TIMEOUT_S, log_path)
            say(f"{policy}: {args.warmup} warm-up + {args.requests} requests, concurrency {args.concurrency}, "
                f"{args.input_len} -> {args.output_len} tokens")
            holder: dict[str, Any] = {}

            async def phase() -> None:
                holder["run"] = await measure(args, url, server.url, policy, prompt_set.warmup, prompt_set.levels[0])

            run_interruptible(phase())
            results["runs"].append(holder["run"])
            r = holder["run"]
            say(f"{policy}: {report.fmt(r['output_tok_s'])} tok/s, {r['completed']}/{r['requests']} ok, "
                f"slow replica share {report.pct(r['slow_share'])}")
            group.stop_all()
    finally:
        stop_everything(server, stages, gateways, results.get("pids", {}))
        for log in logs:
            log.close()


def stop_everything(server: EmbeddedServer, stages: ProcessGroup, gateways: list[ProcessGroup], pids: dict[str, Any]) -> None:
    """Gateways, then stages, then the server, by PID; a second Ctrl-C does not cut this short."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for group in gateways:
            group.stop_all()
        stages.stop_all()
        server.stop()
        known = [p for p in [pids.get("nats-server"), *pids.get("stages", []), *pids.get("gateways", [])] if p]
        killed = reap(known)
        if killed:
            say(f"killed leftover processes {killed}")
    finally:
        signal.signal(signal.SIGINT, previous)


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies or any(p not in POLICIES for p in policies):
        raise SystemExit(f"bench: --policies takes a comma-separated subset of {', '.join(POLICIES)}")
    for flag in ("concurrency", "requests", "input_len", "output_len", "stage_threads"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"bench: --{flag.replace('_', '-')} must be at least 1")
    previous = signal.signal(signal.SIGTERM, _sigterm)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results: dict[str, Any] = {"machine": report.machine_info(), "config": config, "runs": [], "error": None}
    code = 0
    try:
        run(args, policies, results)
    except KeyboardInterrupt:
        results["error"], code = "interrupted", 130
    except ClusterError as exc:
        results["error"], code = f"cluster: {exc}", 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        results["machine"]["load_avg_at_end"] = report.load_average()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        if results["runs"]:
            print(markdown(results["runs"]), flush=True)
            speedup = _speedup(results["runs"])
            if speedup is not None:
                print(f"\nload / round-robin output tok/s: {speedup:.2f}x", flush=True)
        if results["error"]:
            say(f"error: {results['error']}")
        say(f"wrote {args.out}")
    return code


def _speedup(runs: Sequence[dict[str, Any]]) -> float | None:
    rate = {r["policy"]: r["output_tok_s"] for r in runs}
    if rate.get("load") and rate.get("round-robin"):
        return rate["load"] / rate["round-robin"]
    return None


if __name__ == "__main__":
    sys.exit(main())
