"""``parallax-gateway``: the OpenAI-compatible HTTP front of a model served by stages over NATS.

Loads only the tokenizer and config of the model, never its weights.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

import uvicorn

from parallax.broker.cli import add_nats_args, nats_options, run_command
from parallax.broker.connection import connect

from .nats_pipeline import NatsPipeline, PipelineConfig

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="parallax-gateway", description=__doc__)
    p.add_argument("--model", required=True, help="alias (smollm2-135m), HF id, local HF folder or .gguf file")
    p.add_argument("--revision", default=None, help="branch, tag or commit of an HF id (default: main)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--routing", default="load", choices=["load", "round-robin"],
                   help="how each request's replicas are chosen: least expected time from the stages' load and "
                        "speed (default), or in turn")
    p.add_argument("--request-timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="deadline of a request that sends no `timeout` of its own: past it the request is released "
                        "and its client gets an error (default: none)")
    p.add_argument("--chain-wait", type=_seconds, default=PipelineConfig.chain_wait_s, metavar="SECONDS",
                   help="how long a request whose stage died (or handed it back) waits for a replica of the lost "
                        "layers before it fails (default: %(default)g)")
    p.add_argument("--log-level", default="INFO")
    add_nats_args(p)
    return p.parse_args(argv)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def build(args: argparse.Namespace):
    """Resolve the model and load what the gateway needs: tokenizer, context length, layer count, EOS."""
    from transformers import AutoTokenizer

    from parallax.broker.model import ModelFacts, eos_token_ids, resolve_model

    source = resolve_model(args.model, revision=args.revision, need="config")  # an HF id: config and tokenizer only
    facts = ModelFacts.read(source.path)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    eos = sorted(set(eos_token_ids(source.path)) | ({tokenizer.eos_token_id} - {None}))
    return source, facts, tokenizer, eos


async def serve(args: argparse.Namespace) -> None:
    from .app import create_app
    from .watch import Watch, add_watch_routes

    nats = nats_options(args)  # bad connection flags fail before the tokenizer loads
    source, facts, tokenizer, eos = await asyncio.to_thread(build, args)
    nc = await connect(nats, name="parallax-gateway")
    pipeline_config = PipelineConfig(model=source.name, num_layers=facts.num_layers, routing=args.routing,
                                     chain_wait_s=args.chain_wait, js_domain=nats.js_domain)
    pipeline = NatsPipeline(nc, pipeline_config)
    await pipeline.start()
    app = create_app(pipeline, tokenizer, source.name, facts.max_positions, eos, args.request_timeout)
    add_watch_routes(app, Watch(nc, pipeline.registry, nats_url=nats.url, js_domain=nats.js_domain))
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower()))
    log.info("gateway for %s on http://%s:%d (NATS %s, routing %s)", source.name, args.host, args.port, nats.url, args.routing)
    try:
        await server.serve()
    finally:
        with contextlib.suppress(Exception):
            await pipeline.close()
            await nc.drain()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_command("parallax-gateway", serve(args), args.nats, args.log_level)


if __name__ == "__main__":
    main()
