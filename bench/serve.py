"""Serving benchmark for Parallax-NATS, in the spirit of vLLM's ``benchmark_serving``.

    python -m bench.serve                      # baselines, then its own `parallax up`, every check
    python -m bench.serve --url http://127.0.0.1:8000 --nats nats://127.0.0.1:4222   # a running cluster

One run: transformers baselines (with no cluster running), then ``parallax up`` on free ports, a
warm-up, one streaming load per concurrency level (NATS stage stats reset before and collected after),
the prefix-cache check, the memory check, and the cluster is stopped by PID. Results go to
``<out>/latest.json`` and ``<out>/latest.md`` and are printed as markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import report
from bench.client import make_http_client, run_requests, served_model
from bench.cluster import ClusterError, ClusterSpec, Endpoint, healthy, running_cluster
from bench.natsstats import (
    StatsClient,
    merge_peaks,
    poll_peaks,
    stage_label,
    stage_sort_key,
    stats_client,
    summarize_stages,
)
from bench.prompts import PromptSet, build_prompts, tokenizer_encoder
from bench.stats import RequestRecord, summarize_level

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class BenchConfig:
    model: str
    stages: int
    dtype: str
    levels: tuple[int, ...]
    requests: tuple[int, ...]  # per level
    input_len: int
    output_len: int
    seed: int
    out: Path
    url: str | None
    nats: str | None
    extra_up_args: tuple[str, ...]
    skip_baselines: bool
    skip_prefix: bool
    skip_memory: bool
    baseline_batch: int
    prefix_len: int
    suffix_len: int
    prefix_max_tokens: int
    memory_requests: int
    memory_len: int
    memory_max_tokens: int
    timeout_s: float
    memory_timeout_s: float

    def as_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in self.__dict__.items()}


# ------------------------------------------------------------------------------------------- args
def parse_levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--levels wants comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"--levels wants positive integers, got {text!r}")
    return levels


def default_requests(level: int) -> int:
    """Twice the concurrency, at least 8 and at most 64 (one full wave at c=64 keeps the run short)."""
    return min(64, max(8, 2 * level))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model for `parallax up`, the tokenizer and the baselines")
    p.add_argument("--stages", type=int, default=2, help="stage processes for `parallax up`")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES), help="stage and baseline dtype")
    p.add_argument("--levels", type=parse_levels, default=(1, 4, 16, 64), help="concurrency levels, e.g. 1,4,16,64")
    p.add_argument("--requests-per-level", type=int, default=None,
                   help="requests per level (default: min(64, max(8, 2 * level)))")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="new tokens per request (ignore_eos)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt set")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for latest.json / latest.md")
    p.add_argument("--url", default=None, help="use a running gateway (e.g. http://127.0.0.1:8000) instead of `parallax up`")
    p.add_argument("--nats", default=None, help="with --url: its NATS server, for the stage stats")
    p.add_argument("--extra-up-args", default="", help="more arguments for `parallax up` (one shell-quoted string)")
    p.add_argument("--skip-baselines", action="store_true", help="no transformers baselines")
    p.add_argument("--skip-prefix", action="store_true", help="no prefix-cache check")
    p.add_argument("--skip-memory", action="store_true", help="no memory check")
    p.add_argument("--baseline-batch", type=int, default=16, help="batch of the batched baselines")
    p.add_argument("--prefix-len", type=int, default=1000, help="shared prefix tokens of the prefix-cache check")
    p.add_argument("--memory-requests", type=int, default=64, help="concurrent requests of the memory check")
    p.add_argument("--memory-len", type=int, default=1000, help="prompt tokens per memory-check request")
    p.add_argument("--memory-max-tokens", type=int, default=16, help="new tokens per memory-check request")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per level before unfinished requests count as failed")
    p.add_argument("--memory-timeout", type=float, default=480.0, help="the same for the memory check")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    for flag in ("stages", "input_len", "output_len", "baseline_batch", "prefix_len", "memory_requests",
                 "memory_len", "memory_max_tokens"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"bench: --{flag.replace('_', '-')} must be at least 1")
    if args.requests_per_level is not None and args.requests_per_level < 1:
        raise SystemExit("bench: --requests-per-level must be at least 1")
    requests = tuple(args.requests_per_level or default_requests(level) for level in args.levels)
    return BenchConfig(
        model=args.model, stages=args.stages, dtype=args.dtype, levels=tuple(args.levels), requests=requests,
        input_len=args.input_len, output_len=args.output_len, seed=args.seed, out=args.out, url=args.url,
        nats=args.nats, extra_up_args=tuple(shlex.split(args.extra_up_args)), skip_baselines=args.skip_baselines,
        skip_prefix=args.skip_prefix, skip_memory=args.skip_memory, baseline_batch=args.baseline_batch,
        prefix_len=args.prefix_len, suffix_len=16, prefix_max_tokens=4, memory_requests=args.memory_requests,
        memory_len=args.memory_len, memory_max_tokens=args.memory_max_tokens, timeout_s=args.timeout,
        memory_timeout_s=args.memory_timeout,
    )


def say(line: str) -> None:
    print(f"bench {time.strftime('%H:%M:%S')}: {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- prompts
def make_prompts(cfg: BenchConfig, model_path: str) -> PromptSet:
    """The seeded prompt set; the first level gets at least ``baseline_batch`` prompts for the baselines."""
    counts = list(cfg.requests)
    baseline_need = 0 if cfg.skip_baselines else cfg.baseline_batch
    counts[0] = max(counts[0], baseline_need)
    prompts = build_prompts(
        tokenizer_encoder(model_path), cfg.seed, cfg.input_len, counts,
        prefix_len=0 if cfg.skip_prefix else cfg.prefix_len, suffix_len=cfg.suffix_len,
        memory_requests=0 if cfg.skip_memory else cfg.memory_requests, memory_len=cfg.memory_len,
    )
    return prompts


def level_prompts(prompts: PromptSet, cfg: BenchConfig, index: int) -> list[list[int]]:
    return prompts.levels[index][: cfg.requests[index]]


def kv_bytes_per_token(config: dict[str, Any], dtype: str) -> int | None:
    """K and V of every layer for one token, from config.json (None if the keys are missing)."""
    config = config.get("text_config") or config
    layers, heads = config.get("num_hidden_layers"), config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else None)
    if not all(isinstance(v, int) and v > 0 for v in (layers, kv_heads, head_dim)):
        return None
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES[dtype]


# ----------------------------------------------------------------------------------------- phases
async def measure_level(http: Any, model: str | None, stats: StatsClient, prompts: Sequence[list[int]],
                        concurrency: int, cfg: BenchConfig) -> dict[str, Any]:
    await stats.reset()
    records, wall = await run_requests(http, model, prompts, cfg.output_len, concurrency, cfg.timeout_s)
    summary = summarize_level(records, concurrency, wall)
    summary["nats"] = summarize_stages(await stats.collect(), wall)
    summary["load_avg_after"] = report.load_average()
    return summary


async def prefix_check(http: Any, model: str | None, stats: StatsClient, prompts: PromptSet,
                       cfg: BenchConfig) -> dict[str, Any]:
    """A (prefix + suffix A) completes, then B (prefix + suffix B): B's TTFT should be a fraction of A's."""
    await stats.reset()
    first, _ = await run_requests(http, model, [prompts.prefix + prompts.suffix_a], cfg.prefix_max_tokens, 1, cfg.timeout_s)
    second, _ = await run_requests(http, model, [prompts.prefix + prompts.suffix_b], cfg.prefix_max_tokens, 1, cfg.timeout_s)
    replies = await stats.collect()
    a, b = first[0], second[0]
    ttft_a = a.ttft * 1000 if a.ok and a.ttft is not None else None
    ttft_b = b.ttft * 1000 if b.ok and b.ttft is not None else None
    hits = [r["prefix_hit_tokens"] for r in replies if isinstance(r.get("prefix_hit_tokens"), (int, float))]
    return {
        "prefix_len": len(prompts.prefix),
        "suffix_len": len(prompts.suffix_a),
        "max_tokens": cfg.prefix_max_tokens,
        "ttft_a_ms": ttft_a,
        "ttft_b_ms": ttft_b,
        "ratio": ttft_b / ttft_a if ttft_a and ttft_b is not None else None,
        "prefix_hit_tokens": max(hits) if hits else None,
        "stages": [{"stage": stage_label(r), "prefix_hit_tokens": r.get("prefix_hit_tokens")} for r in replies],
        "error": a.error or b.error,
    }


async def memory_check(http: Any, model: str | None, stats: StatsClient, prompts: PromptSet, cfg: BenchConfig,
                       kv_per_token: int | None) -> dict[str, Any]:
    """All memory prompts at once; the stages are sampled every 2 s for peak RSS and KV blocks."""
    await stats.reset()
    peaks: dict[str, dict[str, Any]] = {}
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_peaks(stats, peaks, 2.0, stop))
    try:
        records, wall = await run_requests(http, model, prompts.memory, cfg.memory_max_tokens, len(prompts.memory),
                                           cfg.memory_timeout_s, progress(len(prompts.memory)))
    finally:
        stop.set()
        await poller
    merge_peaks(peaks, await stats.collect())
    summary = summarize_level(records, len(prompts.memory), wall)
    tokens = len(prompts.memory) * (cfg.memory_len + cfg.memory_max_tokens)
    return {
        "requests": summary["requests"],
        "completed": summary["completed"],
        "errors": summary["errors"],
        "prompt_len": cfg.memory_len,
        "max_tokens": cfg.memory_max_tokens,
        "wall_s": wall,
        "ttft_ms": summary["ttft_ms"],
        "kv_bytes_needed": kv_per_token * tokens if kv_per_token else None,
        "stages": sorted((memory_stage(entry) for entry in peaks.values()), key=lambda s: stage_sort_key(s["stage"])),
    }


def progress(total: int, every: int = 8) -> Callable[[RequestRecord], None]:
    """A callback that reports every ``every``-th finished request (and the last)."""
    done: list[RequestRecord] = []

    def on_done(record: RequestRecord) -> None:
        done.append(record)
        if len(done) % every == 0 or len(done) == total:
            failed = sum(1 for r in done if not r.ok)
            say(f"  {len(done)}/{total} finished ({failed} failed)")

    return on_done


def memory_stage(entry: dict[str, Any]) -> dict[str, Any]:
    last = entry.get("last") or {}
    kv = last.get("kv") if isinstance(last.get("kv"), dict) else {}
    return {
        "stage": stage_label(last),
        "node_id": last.get("node_id"),
        "peak_rss_bytes": entry.get("peak_rss_bytes"),
        "kv_budget_bytes": kv.get("budget_bytes"),
        "kv_blocks_total": kv.get("blocks_total"),
        "peak_kv_blocks_used": entry.get("peak_kv_blocks_used"),
    }


async def serve_phases(cfg: BenchConfig, endpoint: Endpoint, prompts: PromptSet, results: dict[str, Any],
                       kv_per_token: int | None) -> None:
    """Warm-up, every level, prefix and memory checks; results are filled in as they come."""
    width = max([*cfg.levels, cfg.memory_requests if not cfg.skip_memory else 1])
    async with make_http_client(endpoint.url, width) as http, stats_client(endpoint.nats_url, endpoint.stages) as stats:
        model = await served_model(http)
        say(f"serving {model} at {endpoint.url}; NATS stats {'on' if stats.connected else 'off'}; warm-up")
        await run_requests(http, model, prompts.warmup, 4, len(prompts.warmup), cfg.timeout_s)
        say("level: " + " | ".join(report.LEVEL_HEADERS))
        for index, concurrency in enumerate(cfg.levels):
            summary = await measure_level(http, model, stats, level_prompts(prompts, cfg, index), concurrency, cfg)
            results["levels"].append(summary)
            say("level: " + " | ".join(report.level_row(summary)))
        if not cfg.skip_prefix:
            say(f"prefix cache check ({cfg.prefix_len} shared tokens)")
            results["prefix_cache"] = await prefix_check(http, model, stats, prompts, cfg)
        if not cfg.skip_memory:
            say(f"memory check ({cfg.memory_requests} x {cfg.memory_len} tokens)")
            results["memory"] = await memory_check(http, model, stats, prompts, cfg, kv_per_token)


def run_interruptible(phases: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run(phases)``; Ctrl-C or SIGTERM raise KeyboardInterrupt once the phases have stopped.
    The main task is cancelled again every 0.5 s until it ends: on Python 3.11 ``asyncio.wait_for``
    swallows a cancellation that lands as its awaitable completes (a NATS flush, a stats reply)."""
    if not asyncio.run(_until_signal(phases)):
        raise KeyboardInterrupt


async def _until_signal(phases: Coroutine[Any, Any, None]) -> bool:
    """True when ``phases`` ran to the end, False when a signal stopped them."""
    loop, task = asyncio.get_running_loop(), asyncio.ensure_future(phases)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def cancel() -> None:
        if not task.done():
            task.cancel()
            loop.call_later(0.5, cancel)

    for sig in previous:
        loop.add_signal_handler(sig, cancel)
    try:
        await task
        return True
    except asyncio.CancelledError:
        return False
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)


def run_serving(cfg: BenchConfig, prompts: PromptSet, results: dict[str, Any], kv_per_token: int | None) -> None:
    if cfg.url:
        endpoint = Endpoint(cfg.url.rstrip("/").removesuffix("/v1"), cfg.nats)
        if not healthy(endpoint.url):
            raise ClusterError(f"{endpoint.url}/health does not answer 200")
        results["cluster"] = {"url": endpoint.url, "nats": endpoint.nats_url, "started_by_bench": False}
        run_interruptible(serve_phases(cfg, endpoint, prompts, results, kv_per_token))
        return
    spec = ClusterSpec(cfg.model, cfg.stages, cfg.dtype, cfg.extra_up_args)
    say(f"starting parallax up ({cfg.stages} stages, {cfg.dtype}); log in {cfg.out / 'cluster.log'}")
    started = time.perf_counter()
    with running_cluster(spec, cfg.out / "cluster.log") as endpoint:
        results["cluster"] = {"url": endpoint.url, "nats": endpoint.nats_url, "started_by_bench": True,
                              "pids": endpoint.pids, "ready_s": time.perf_counter() - started}
        run_interruptible(serve_phases(cfg, endpoint, prompts, results, kv_per_token))
    say("cluster stopped")


def run_baselines_phase(cfg: BenchConfig, model_path: str, prompts: PromptSet, results: dict[str, Any]) -> None:
    from bench.baselines import run_baselines

    if cfg.url:
        say("warning: baselines run while the external cluster at --url is up (they share the CPU)")
    results["baselines"] = run_baselines(model_path, cfg.dtype, prompts.levels[0], cfg.output_len,
                                         cfg.baseline_batch, say=say)
    results["baselines"]["load_avg_after"] = report.load_average()


# ------------------------------------------------------------------------------------------- main
def new_results(cfg: BenchConfig) -> dict[str, Any]:
    return {"machine": report.machine_info(), "config": cfg.as_json(), "cluster": None, "levels": [],
            "baselines": None, "prefix_cache": None, "memory": None, "targets": [], "error": None}


def run(cfg: BenchConfig, results: dict[str, Any]) -> None:
    from parallax.broker.model import read_config, resolve_model

    warning = report.busy_warning(results["machine"])
    if warning:
        say(f"warning: {warning}")
    source = resolve_model(cfg.model)
    say(f"building the prompt set (seed {cfg.seed}) with {source.name}'s tokenizer")
    prompts = make_prompts(cfg, str(source.path))
    if not cfg.skip_baselines:
        run_baselines_phase(cfg, str(source.path), prompts, results)
    run_serving(cfg, prompts, results, kv_bytes_per_token(read_config(source.path), cfg.dtype))


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(build_parser().parse_args(argv))
    previous = signal.signal(signal.SIGTERM, _sigterm)
    results = new_results(cfg)
    code = 0
    try:
        run(cfg, results)
    except KeyboardInterrupt:
        results["error"], code = "interrupted", 130
    except ClusterError as exc:
        results["error"], code = f"cluster: {exc}", 1
    except Exception as exc:
        results["error"], code = f"{type(exc).__name__}: {exc}", 1
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        results["machine"]["load_avg_at_end"] = report.load_average()
        results["targets"] = report.compute_targets(results)
        json_path, md_path = report.write_results(results, cfg.out)
        print(report.markdown(results), flush=True)
        say(f"wrote {json_path} and {md_path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
