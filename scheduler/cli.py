"""``parallax-scheduler``: place the layers of every model on stages started without ``--layers``."""

from __future__ import annotations

import argparse
import asyncio
import signal

from parallax.broker.cli import add_nats_args, nats_options, run_command

from .service import Scheduler, SchedulerConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="parallax-scheduler", description=__doc__)
    p.add_argument("--node-id", default=None, help="unique name of this scheduler (default: host + random)")
    p.add_argument("--kv-reserve-tokens", type=int, default=4096,
                   help="KV cache positions reserved per layer when fitting layers into a node's memory")
    p.add_argument("--hop-ms", type=float, default=1.0,
                   help="network cost of one hop per step, weighed against faster stages when choosing how many stages a pipeline has")
    p.add_argument("--tolerance", type=float, default=0.10,
                   help="keep the current placement unless another is this much faster (0.10 = 10%%)")
    p.add_argument("--log-level", default="INFO")
    add_nats_args(p)
    return p.parse_args(argv)


def config(args: argparse.Namespace) -> SchedulerConfig:
    extra = {} if args.node_id is None else {"node_id": args.node_id}
    return SchedulerConfig(nats=nats_options(args), kv_reserve_tokens=args.kv_reserve_tokens, hop_ms=args.hop_ms,
                           tolerance=args.tolerance, **extra)


async def serve(args: argparse.Namespace) -> None:
    scheduler = Scheduler(config(args))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await scheduler.run(stop)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_command("parallax-scheduler", serve(args), args.nats, args.log_level)


if __name__ == "__main__":
    main()
