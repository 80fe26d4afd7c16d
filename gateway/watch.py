"""What lets an operator see the cluster through the gateway: ``/metrics`` (Prometheus; with
``?cluster=1`` every stage's series too, gathered over NATS).

:func:`add_watch_routes` adds them to an app made by :func:`~parallax.gateway.app.create_app`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import Response
from nats.aio.client import Client as NATS
from prometheus_client import CONTENT_TYPE_LATEST

from parallax.broker import subjects
from parallax.broker.observe import GATHER_S, gather
from parallax.broker.registry import Registry

from .metrics import GatewayMetrics, merge_expositions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Watch:
    """What the watch routes read besides the app: the gateway's NATS connection (None: no cluster)."""

    nc: NATS | None
    registry: Registry | None = None  # the gateway's live view: how many stages should answer
    nats_url: str = ""  # the NATS server the gateway uses (the join command names it)
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


def add_watch_routes(app: FastAPI, watch: Watch) -> None:
    metrics: GatewayMetrics = app.state.metrics

    async def prometheus(request: Request) -> Response:
        own = metrics.exposition()
        if request.query_params.get("cluster") not in ("1", "true", "yes"):
            return Response(own, media_type=CONTENT_TYPE_LATEST)
        return Response(merge_expositions([own, *await stage_expositions(watch.nc, watch.gather_s, watch.stages())]),
                        media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", prometheus, methods=["GET"], response_model=None, include_in_schema=False)
