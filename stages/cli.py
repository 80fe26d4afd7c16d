"""``parallax-stage``: serve one layer range of a model over NATS."""

from __future__ import annotations

import argparse
import asyncio
import signal

from parallax.broker.cli import run_command

from .worker import StageWorker, WorkerConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="parallax-stage", description=__doc__)
    p.add_argument("--model", required=True, help="alias (smollm2-135m), HF id, local HF folder or .gguf file")
    p.add_argument("--layers", required=True, help="half-open global layer range, e.g. 0:15")
    p.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS server URL")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--node-id", default=None, help="unique name of this stage (default: host + random)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    from parallax.scheduler.allocation import parse_layers

    from .source import resolve_model
    from .torch_backend import TorchBackend

    start, end = parse_layers(args.layers)
    source = resolve_model(args.model)
    backend = await asyncio.to_thread(TorchBackend.load, source.path, source.name, start, end, args.dtype, args.device)
    config = WorkerConfig(nats_url=args.nats) if args.node_id is None else WorkerConfig(nats_url=args.nats, node_id=args.node_id)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await StageWorker(backend, config).run(stop)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_command("parallax-stage", serve(args), args.nats, args.log_level)


if __name__ == "__main__":
    main()
