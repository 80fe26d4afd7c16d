"""``parallax-stage``: serve one layer range of a model over NATS."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import platform
import signal
from pathlib import Path

from parallax.broker.cli import add_nats_args, nats_options, run_command
from parallax.broker.errors import UsageError
from parallax.broker.registry import DRAIN_TIMEOUT_S

from .compute import ComputeThread
from .cores import SharedCores
from .engine import EngineConfig
from . import otel
from .metrics import metrics_port
from .models import QUANTIZE_TYPES
from .worker import NodeFacts, StageWorker, WorkerConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="parallax-stage", description=__doc__)
    p.add_argument("--model", required=True, help="alias (smollm2-135m), HF id, local HF folder or .gguf file")
    p.add_argument("--revision", default=None,
                   help="branch, tag or commit of an HF id (default: main); its shards are downloaded once")
    p.add_argument("--layers", default=None,
                   help="half-open global layer range, e.g. 0:15 (default: ask a parallax-scheduler for one)")
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="memory this node offers for weights + KV cache, e.g. 8GiB (default: 80%% of free memory)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="activation and KV cache dtype (weights stay as stored: bf16/fp16 as is, GGUF as its blocks)")
    p.add_argument("--quantize", choices=QUANTIZE_TYPES, default=None,
                   help="hold a Hugging Face checkpoint's weight matrices as GGUF blocks of this type (quantized at load)")
    p.add_argument("--dequantize", action="store_true",
                   help="serve a GGUF model from a dense safetensors copy instead of its quantized blocks")
    p.add_argument("--backend", default="auto", metavar="{auto,torch,mlx}",
                   help="compute backend: torch, mlx (Apple silicon; the CPU build elsewhere), or auto: mlx on "
                        "macOS arm64, torch elsewhere")
    p.add_argument("--device", default=None,
                   help="torch: cpu, cuda, cuda:1 ... (default: cuda when present); mlx: cpu or gpu (default: gpu "
                        "when Metal is present)")
    p.add_argument("--node-id", default=None, help="unique name of this stage (default: host + random)")
    e = p.add_argument_group("engine")
    e.add_argument("--max-batch-size", type=int, default=256, help="requests in one forward")
    e.add_argument("--max-tokens-per-step", type=int, default=512, help="rows (prefill + decode) in one forward")
    e.add_argument("--chunk-tokens", type=int, default=512, help="prompt chunk size (also capped to fit NATS max_payload)")
    e.add_argument("--block-size", type=int, default=16, help="positions per KV block")
    budget = e.add_mutually_exclusive_group()
    budget.add_argument("--kv-cache-memory", type=float, metavar="GIB", help="KV cache size in GiB")
    budget.add_argument("--kv-cache-fraction", type=float, default=0.05, help="KV cache as a fraction of free memory (default 0.05)")
    e.add_argument("--no-prefix-cache", action="store_true", help="do not share KV blocks of common prompt prefixes")
    e.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--debug-delay-ms", type=float, default=0.0, metavar="MS",
                   help="sleep MS after every engine step: a slow node on purpose (routing tests and benchmarks)")
    p.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT_S, metavar="S",
                   help="on SIGTERM/SIGINT, stop taking new requests and let running ones finish here for up to S "
                        "seconds when no other stage serves this range (else hand them back at once); a second "
                        "signal hands everything back and exits (default %(default)g)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="also serve this stage's Prometheus metrics on http://0.0.0.0:PORT/metrics (they are always "
                        "answered over NATS: `parallax metrics`, the gateway's /metrics?cluster=1)")
    p.add_argument("--log-level", default="INFO")
    add_nats_args(p)
    return p.parse_args(argv)


BACKENDS = ("auto", "torch", "mlx")
MLX_INSTALL = "pip install 'parallax-nats[mlx]'"


def resolve_backend(name: str) -> str:
    """``--backend`` -> "torch" or "mlx": auto picks mlx on macOS arm64, torch elsewhere. UsageError
    (exit 2) for an unknown name or an mlx that is not installed."""
    if name not in BACKENDS:
        raise UsageError(f"--backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = "mlx" if platform.system() == "Darwin" and platform.machine() == "arm64" else "torch"
    if name == "mlx" and any(importlib.util.find_spec(m) is None for m in ("mlx", "mlx_lm")):
        raise UsageError(f"--backend mlx needs mlx and mlx-lm ({MLX_INSTALL})")
    return name


def backend_class(name: str):
    """The Backend class of a resolved backend name (imports torch or mlx)."""
    if name == "mlx":
        from .mlx_backend import MLXBackend

        return MLXBackend
    from .torch_backend import TorchBackend

    return TorchBackend


def kv_budget_bytes(args: argparse.Namespace, device: str) -> int:
    """Bytes for the KV pool: ``--kv-cache-memory`` GiB, else a fraction of the device's free memory."""
    if args.kv_cache_memory is not None:
        if args.kv_cache_memory <= 0:
            raise ValueError("--kv-cache-memory must be positive")
        return int(args.kv_cache_memory * (1 << 30))
    if not 0 < args.kv_cache_fraction <= 0.9:
        raise ValueError("--kv-cache-fraction must be in (0, 0.9]")
    return int(args.kv_cache_fraction * free_memory(device))


def free_memory(device: str) -> int:
    import psutil
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return psutil.virtual_memory().available


def engine_config(args: argparse.Namespace, backend) -> EngineConfig:
    blocks = kv_budget_bytes(args, backend.spec.device) // backend.kv_block_bytes(args.block_size)
    if blocks < 1:
        raise ValueError("the KV cache budget is smaller than one block")
    return EngineConfig(
        max_batch_size=args.max_batch_size, max_tokens_per_step=args.max_tokens_per_step, chunk_tokens=args.chunk_tokens,
        block_size=args.block_size, kv_blocks=blocks, prefix_cache=not args.no_prefix_cache,
    )


async def serve(args: argparse.Namespace) -> None:
    from parallax.broker.cli import parse_size
    from parallax.broker.layers import parse_layers
    from parallax.broker.model import fetch_layers, resolve_model

    from .models import architecture

    nats_options(args)  # bad connection flags fail before anything loads (worker_config builds them again)
    backend_name = resolve_backend(args.backend)
    if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
        raise UsageError(f"--metrics-port must be in 1..65535, got {args.metrics_port}")
    layers = parse_layers(args.layers) if args.layers is not None else None
    offered = parse_size(args.memory) if args.memory is not None else None
    import torch

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    source = resolve_model(args.model, dequantize=args.dequantize, revision=args.revision, need="headers",
                           check=architecture)
    device = default_device(backend_name, args.device)
    check_quantize(source.path, args.quantize, device, backend_name)
    cores = SharedCores(torch.get_num_threads()) if device == "cpu" else None  # CPU stages share a machine's cores
    compute = ComputeThread(cores)  # every torch/numba computation of this process (stages/compute.py)
    facts = await compute.run(node_facts, source.path, args.dtype, device, offered, layers is not None,
                              args.quantize, backend_name)
    config = worker_config(args, source.path)
    drain, stop = asyncio.Event(), asyncio.Event()  # the first signal drains, a second one stops at once
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: (stop if drain.is_set() else drain).set())
    backend = backend_class(backend_name)

    def load(start: int, end: int, progress=None):
        fetch_layers(source, start, end, progress)  # an HF id's shards of these layers, unless cached
        return backend.load(source.path, source.name, start, end, args.dtype, device, args.quantize)

    with metrics_port(args.metrics_port):  # a port in use: OSError, exit 2
        if layers is None:
            from .auto import AutoStage

            stage = AutoStage(source.name, facts.profile.num_layers, device, args.dtype,
                              lambda start, end: load(start, end, stage.downloaded), lambda b: engine_config(args, b),
                              config, facts, compute)
            await stage.run(stop, drain=drain)
            return
        loaded = await compute.run(load, *layers)
        worker = await compute.run(StageWorker, loaded, config, engine_config(args, loaded), facts, compute)
        await worker.run(stop, drain=drain)


def default_device(backend: str, device: str | None) -> str:
    """--device checked for the backend, or the backend's default."""
    if backend == "mlx":
        from .mlx_backend import check_device

        return check_device(device)
    from .torch_backend import default_device as torch_default

    return device or torch_default()


def worker_config(args: argparse.Namespace, tokenizer_path: Path | None = None) -> WorkerConfig:
    named = {} if args.node_id is None else {"node_id": args.node_id}
    return WorkerConfig(nats=nats_options(args), debug_delay_ms=args.debug_delay_ms, drain_timeout_s=args.drain_timeout,
                        tokenizer_path=tokenizer_path, export_spans=otel.from_env(), **named)


def check_quantize(path, quantize: str | None, device: str, backend: str = "torch") -> None:
    """--quantize against the resolved source, before anything is measured or loaded."""
    if backend == "mlx":
        from parallax.broker.model import gguf_file

        from .models import already_quantized

        if quantize is not None and (file := gguf_file(path)) is not None:
            raise already_quantized(file.name)
        return
    import torch

    from .torch_backend import open_weights, quantize_type

    quantize_type(quantize, open_weights(path), torch.device(device))


def node_facts(path, dtype: str, device: str, offered: int | None, manual: bool, quantize: str | None = None,
               backend: str = "torch") -> NodeFacts:
    """Memory, the model's sizes (weights as this stage holds them) and a speed estimate measured on
    the backend that will serve, for the registry and the scheduler."""
    from .profile import active_layer_bytes, estimate_layer_ms, model_profile
    from parallax.broker.model import ModelFacts

    profile = model_profile(path, dtype, quantize=quantize)
    total = total_memory(device)
    hidden = ModelFacts.read(path).hidden_size
    active = active_layer_bytes(path, dtype, quantize)  # a MoE layer's routed experts: the k a token uses
    if backend == "mlx":
        from . import mlx_backend

        layer_ms = mlx_backend.estimate_layer_ms(active, hidden, dtype)
    else:
        layer_ms = estimate_layer_ms(active, hidden, dtype, device)
    return NodeFacts(memory_total=total, memory_offered=offered or int(0.8 * free_memory(device)), profile=profile,
                     manual=manual, layer_ms=layer_ms, backend=backend)


def total_memory(device: str) -> int:
    import psutil
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[1]
    return psutil.virtual_memory().total


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_command("parallax-stage", serve(args), args.nats, args.log_level)


if __name__ == "__main__":
    main()
