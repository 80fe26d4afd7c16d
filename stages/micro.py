"""Every serving stage is also a ``nats.micro`` service named ``parallax-stage``, so the ``nats`` CLI
sees the cluster:

    nats micro ls                          every stage: id, version, description (model and layers)
    nats micro info parallax-stage         metadata: model, layers, backend, node id, device, dtype
    nats micro stats parallax-stage        per stage: load, requests admitted, errors by code, steps
    nats req parallax.stage.<node> ''      one stage's full counters (the ``parallax.stats`` answer)

The service runs while a :class:`~.worker.StageWorker` is attached (a stage moved to another range
shows up again with its new layers). Its answers are built from the worker on every request.
"""

from __future__ import annotations

import logging
from typing import Protocol

import orjson
from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service

from parallax import __version__
from parallax.broker import subjects
from parallax.broker.registry import NodeInfo

log = logging.getLogger(__name__)
SERVICE = "parallax-stage"


class Serving(Protocol):
    """What the service reads of a stage worker."""

    def describe(self) -> NodeInfo: ...

    def stats(self) -> dict: ...


def metadata(info: NodeInfo) -> dict[str, str]:
    """The service's metadata (strings only): what ``nats micro info`` shows of a stage."""
    layers = "" if info.layers is None else f"{info.start}:{info.end}"
    return {"model": info.model, "layers": layers, "num_layers": str(info.num_layers), "backend": info.backend,
            "node_id": info.node_id, "device": info.device, "dtype": info.dtype, "host": info.host}


def load_stats(worker: Serving) -> dict:
    """The ``data`` of the endpoint's stats (``nats micro stats``): load, requests, errors."""
    info, counters = worker.describe(), worker.stats()
    return {"node_id": info.node_id, "layers": metadata(info)["layers"], "load": info.load.model_dump(),
            "requests": counters["requests"], "errors": counters["errors"], "steps": counters["steps"],
            "preempted": counters["preempted"]}


async def start(nc: NATS, worker: Serving) -> Service:
    """Register ``worker`` as an instance of ``parallax-stage`` on ``nc``; stop it with ``service.stop()``."""
    info = worker.describe()
    meta = metadata(info)

    def on_stats(_: EndpointStats) -> dict:
        return load_stats(worker)

    async def on_request(request: Request) -> None:
        await request.respond(orjson.dumps(worker.stats()), headers={"Content-Type": "application/json"})

    service = await add_service(nc, name=SERVICE, version=__version__, metadata=meta, stats_handler=on_stats,
                                description=f"{info.model} layers {meta['layers']} on {info.node_id}")
    # queue group = the node id: each stage answers its own subject (no sharing across replicas)
    await service.add_endpoint(name="stats", subject=subjects.stage(info.node_id), handler=on_request,
                               queue_group=subjects.token(info.node_id), metadata={"layers": meta["layers"]})
    return service


async def stop(service: Service | None) -> None:
    """Stop answering (the connection may already be closing: never raises)."""
    if service is None:
        return
    try:
        await service.stop()
    except Exception as e:  # a closed connection: its subscriptions are gone anyway
        log.debug("micro service stop: %s: %s", type(e).__name__, e)
