"""``parallax metrics``: ask every stage over NATS for its series and print them as one Prometheus
exposition (what the gateway's ``/metrics?cluster=1`` adds to its own).
``parallax trace ID``: ask every stage for its spans of one request (its id, as the response carries
it, or its W3C trace id) and print the hops and their times.
``parallax evict NODE``: delete a ghost's record (a node whose heartbeat stopped but whose key stayed)
from the registry.

Errors are raised (``parallax``'s main prints one line): NATS unreachable or bad input exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.aio.client import Client as NATS

from parallax.broker import subjects
from parallax.broker.cli import add_nats_args, nats_options
from parallax.broker.connection import NatsOptions
from parallax.broker.errors import ParallaxError, RegistryError, UsageError
from parallax.broker.observe import gather

T = TypeVar("T")


def add_wait(parser: argparse.ArgumentParser) -> None:
    add_nats_args(parser)
    parser.add_argument("--wait", type=float, default=2.0, metavar="S",
                        help="seconds to wait for the stages' answers, at most: it ends once every stage the "
                             "registry lists as serving has answered (default %(default)g)")


async def _with_nats(options: NatsOptions, timeout_s: float, work: Callable[[NATS], Awaitable[T]]) -> T:
    from parallax.broker.connection import connect

    connection_log = logging.getLogger("parallax.broker.connection")
    level = connection_log.level
    connection_log.setLevel(logging.ERROR)  # no per-attempt or on-close warnings: an error is the one line
    try:
        nc = await connect(options, name="parallax-cli", first_connect_s=timeout_s)
        try:
            return await work(nc)
        finally:
            await nc.close()
    finally:
        connection_log.setLevel(level)


async def ask_stages(nc: NATS, subject: str, payload: bytes, wait_s: float, js_domain: str | None = None) -> list[bytes]:
    """Every stage's answer to ``payload`` on ``subject``: until each stage the registry lists as
    serving has answered, or ``wait_s``."""
    from parallax.broker.kv import nodes_bucket, parse_node, snapshot

    try:
        records = await snapshot(await nodes_bucket(nc, js_domain))
        expected = sum(1 for v in records.values() if (n := parse_node(v)) is not None and n.serves)
    except Exception:  # noqa: BLE001 -- no registry (no JetStream): wait the whole window
        expected = None
    return await gather(nc, subject, payload, wait_s=wait_s, expected=expected or None)


def _check_wait(args: argparse.Namespace) -> None:
    if not 0 < args.wait <= 60:
        raise UsageError(f"--wait must be in (0, 60] seconds, got {args.wait}")


def run_metrics(args: argparse.Namespace) -> int:
    """Print every stage's series (nothing but a comment when no stage answers)."""
    from parallax.gateway.metrics import merge_expositions

    _check_wait(args)
    texts = asyncio.run(_with_nats(nats_options(args), 5.0, lambda nc: ask_stages(nc, subjects.METRICS, b"", args.wait, args.js_domain)))
    if not texts:
        print(f"# no stage answered on {subjects.METRICS} within {args.wait:g} s", file=sys.stderr)
        return 0
    sys.stdout.write(merge_expositions(texts).decode())
    return 0


def run_trace(args: argparse.Namespace) -> int:
    import orjson

    _check_wait(args)
    query = orjson.dumps({"id": args.id})
    replies = asyncio.run(_with_nats(nats_options(args), 5.0, lambda nc: ask_stages(nc, subjects.TRACE, query, args.wait, args.js_domain)))
    stages = [r for r in map(_json, replies) if isinstance(r, dict)]
    traced = [s for s in stages if s.get("spans")]
    if not traced:
        raise ParallaxError(f"no stage has spans of {args.id!r} ({len(stages)} stages answered; each keeps its last "
                            "spans in a ring: an old request is gone)")
    print(orjson.dumps(traced).decode() if args.json else render_trace(args.id, traced, args.spans))
    return 0


def _json(data: bytes):
    import orjson

    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


SPAN_KINDS = ("hop", "queue", "compute", "send")
TRACE_COLUMNS = ("LAYERS", "NODE", "PASSES", "ROWS", "HOP_MS", "QUEUE_MS", "COMPUTE_MS", "SEND_MS", "FIRST_MS", "LAST_MS")


def render_trace(wanted: str, stages: list[dict], every_span: bool = False) -> str:
    """One row per stage, in layer order: its passes (steps that ran the request), rows, the mean of
    each span kind per pass (ms), and when it first and last worked on the request (ms from the
    request's first span). ``every_span``: then every span in time order."""
    from parallax.status import table

    stages = sorted(stages, key=lambda s: (s.get("start") or 0, str(s.get("node_id"))))
    spans = [(s, span) for s in stages for span in s["spans"]]
    t0 = min(span["start"] for _, span in spans)
    trace_ids = sorted({span["trace_id"] for _, span in spans})
    tries = sorted({span["rid"] for _, span in spans})
    lines = [f"request {wanted}: trace {', '.join(trace_ids)}; tries {', '.join(tries)}"]
    rows = []
    for s in stages:
        by_kind = {k: [sp for sp in s["spans"] if sp["kind"] == k] for k in SPAN_KINDS}
        passes = len(by_kind["compute"])
        means = [_mean_ms(by_kind[k], passes) for k in SPAN_KINDS]
        first = min(sp["start"] for sp in s["spans"]) - t0
        last = max(sp["end"] for sp in s["spans"]) - t0
        rows.append([f"{s.get('start')}:{s.get('end')}", str(s.get("node_id")), str(passes),
                     str(sum(sp["rows"] for sp in by_kind["compute"])), *means, f"{first * 1000:.1f}",
                     f"{last * 1000:.1f}"])
    lines += table(rows, TRACE_COLUMNS)
    for s in stages:
        if s.get("dropped"):
            lines.append(f"{s.get('node_id')}: its {s['dropped']} earliest spans did not fit in one answer")
    if every_span:
        lines.append("")
        for s, span in sorted(spans, key=lambda pair: pair[1]["start"]):
            rows_text = f" rows {span['rows']}" if span["kind"] == "compute" else ""
            lines.append(f"+{(span['start'] - t0) * 1000:9.2f} ms  {s.get('start')}:{s.get('end')} {s.get('node_id')}  "
                         f"{span['kind']:<7} {(span['end'] - span['start']) * 1000:8.2f} ms{rows_text}  {span['rid']}")
    return "\n".join(lines)


def _mean_ms(spans: list[dict], passes: int) -> str:
    """The time of ``spans`` per pass (ms), or ``-`` when there is none."""
    if not spans:
        return "-"
    return f"{sum(sp['end'] - sp['start'] for sp in spans) * 1000 / max(1, passes or len(spans)):.2f}"


async def evict(nc: NATS, node_id: str, force: bool = False, js_domain: str | None = None,
                now: float | None = None) -> list[str]:
    """Delete every record of ``node_id`` (``stage.``/``gateway.``/``scheduler.<id>``); the keys deleted.
    UsageError when there is none, or when it still heartbeats (unless ``force``)."""
    from parallax.broker.kv import KINDS, nodes_bucket, parse_node, snapshot
    from parallax.broker.registry import node_key
    from parallax.status import STALE_S

    kv = await nodes_bucket(nc, js_domain)
    records = await snapshot(kv)
    keys = [key for key in (node_key(kind, node_id) for kind in KINDS) if key in records]
    if not keys:
        raise UsageError(f"no node {node_id!r} in the registry (see `parallax status`)")
    now = time.time() if now is None else now
    for key in keys:
        info = parse_node(records[key])
        age = None if info is None else now - info.updated
        if age is not None and age <= STALE_S and not force:
            raise UsageError(f"{key} is alive (last heartbeat {age:.1f} s ago): stop that node instead, or "
                             "pass --force")
    for key in keys:
        try:
            await kv.delete(key)
        except Exception as e:  # noqa: BLE001 -- JetStream API errors: one line
            raise RegistryError(f"cannot delete {key}: {type(e).__name__}: {e}") from None
    return keys


def run_evict(args: argparse.Namespace) -> int:
    keys = asyncio.run(_with_nats(nats_options(args), 5.0, lambda nc: evict(nc, args.node, args.force, args.js_domain)))
    print(f"evicted {', '.join(keys)}")
    return 0
