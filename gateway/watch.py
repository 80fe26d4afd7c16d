"""What lets an operator see the cluster through the gateway:

    GET /             the web page (gateway/web/: plain HTML, JS and CSS, no build step): the cluster
                      live, the command a new machine runs to join, a chat
    GET /v1/cluster   the registry as ``parallax status --json`` shows it (ghosts: health "stale"),
                      plus the served model and the join command
    GET /metrics      Prometheus; with ``?cluster=1`` every stage's series too, gathered over NATS

and a trace context per request: the W3C ``traceparent`` header of the HTTP request (else a new
trace), which the pipeline sends on in the NATS headers of the request's messages; the response
names the gateway's span in its own ``traceparent`` header.

:func:`add_watch_routes` adds them to an app made by :func:`~parallax.gateway.app.create_app`.
"""

from __future__ import annotations

import ipaddress
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from nats.aio.client import Client as NATS
from prometheus_client import CONTENT_TYPE_LATEST

from parallax.broker import subjects
from parallax.broker.observe import GATHER_S, TraceContext, current_trace, gather
from parallax.broker.kv import nodes_bucket, snapshot
from parallax.broker.registry import Registry
from parallax.status import build_status

from .metrics import GatewayMetrics, merge_expositions

log = logging.getLogger(__name__)
WEB = Path(__file__).parent / "web"  # shipped as package data (pyproject: tool.setuptools.package-data)


@dataclass(frozen=True)
class Watch:
    """What the watch routes read besides the app: the gateway's NATS connection (None: no cluster)."""

    nc: NATS | None
    registry: Registry | None = None  # the gateway's live view: how many stages should answer
    nats_url: str = ""  # the NATS server the gateway uses (the join command names it)
    js_domain: str | None = None  # the JetStream domain of the registry bucket (None: the server's own)
    gather_s: float = GATHER_S  # how long /metrics?cluster=1 waits for the stages' answers (less once all did)

    def stages(self) -> int | None:
        """Stages serving now, by the registry (None: unknown)."""
        return None if self.registry is None else sum(1 for n in self.registry.nodes(None, "stage") if n.serves)

    def __post_init__(self) -> None:
        if not self.gather_s > 0:
            raise ValueError("gather_s must be positive")


async def stage_expositions(nc: NATS | None, wait_s: float = GATHER_S, expected: int | None = None) -> list[bytes]:
    """Every stage's Prometheus text, asked over NATS (``parallax.metrics``)."""
    if nc is None or not nc.is_connected:
        return []
    return await gather(nc, subjects.METRICS, wait_s=wait_s, expected=expected)


class TraceMiddleware:
    """ASGI middleware: the request's trace context (``traceparent``, else a new trace) is
    :data:`~parallax.broker.observe.current_trace` while it is served, and its response says it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers") or []).get(b"traceparent", b"").decode("latin-1")
        parent = TraceContext.parse(sent)
        ctx = parent.child() if parent is not None else TraceContext.new()

        async def traced_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"traceparent", ctx.traceparent.encode())]}
            await send(message)

        token = current_trace.set(ctx)
        try:
            await self.app(scope, receive, traced_send)
        finally:
            current_trace.reset(token)


def add_watch_routes(app: FastAPI, watch: Watch) -> None:
    metrics: GatewayMetrics = app.state.metrics
    app.add_middleware(TraceMiddleware)

    async def prometheus(request: Request) -> Response:
        own = metrics.exposition()
        if request.query_params.get("cluster") not in ("1", "true", "yes"):
            return Response(own, media_type=CONTENT_TYPE_LATEST)
        return Response(merge_expositions([own, *await stage_expositions(watch.nc, watch.gather_s, watch.stages())]),
                        media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", prometheus, methods=["GET"], response_model=None, include_in_schema=False)
    bucket = None

    async def cluster(request: Request) -> Response:
        nonlocal bucket
        records: dict[str, bytes] = {}
        if watch.nc is not None and watch.nc.is_connected:
            bucket = bucket or await nodes_bucket(watch.nc, watch.js_domain)
            records = await snapshot(bucket)
        status = build_status(records)
        status["served_model"] = metrics.model_name
        status["join"] = join_command(metrics.model_name, watch.nats_url, request.url.hostname or "127.0.0.1", status)
        return JSONResponse(status)

    async def page() -> Response:
        return FileResponse(WEB / "index.html")

    app.add_api_route("/v1/cluster", cluster, methods=["GET"], response_model=None)
    app.add_api_route("/", page, methods=["GET"], response_model=None, include_in_schema=False)
    app.mount("/web", StaticFiles(directory=WEB), name="web")


def join_command(model: str, nats_url: str, page_host: str, status: dict[str, Any]) -> str:
    """What a new machine runs to serve ``model`` in this cluster: with a scheduler it is placed;
    without one it takes the first missing range (or adds a replica of the first range)."""
    args = ["parallax-stage", "--model", model, "--nats", reachable_nats(nats_url, page_host)]
    if not status.get("leader"):
        coverage = status.get("models", {}).get(model, {})
        missing, segments = coverage.get("missing") or [], coverage.get("coverage") or []
        layers = missing[0] if missing else [segments[0]["start"], segments[0]["end"]] if segments else None
        if layers is not None:
            args += ["--layers", f"{layers[0]}:{layers[1]}"]
    return shlex.join(args)


def reachable_nats(nats_url: str, page_host: str) -> str:
    """``nats_url`` as another machine reaches it: a loopback host becomes the host the page was
    loaded from (the gateway's machine, where ``parallax up`` also runs NATS)."""
    parts = urlsplit(nats_url or "nats://127.0.0.1:4222")
    host = parts.hostname or "127.0.0.1"
    if _loopback(host) and not _loopback(page_host):
        host = page_host
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme or 'nats'}://{host}:{parts.port or 4222}"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
