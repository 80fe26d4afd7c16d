"""Subject names. Every subject starts with ``parallax.`` so ``nats sub 'parallax.>'`` shows all.

    parallax.<model>.layers.<a>-<b>.<node>     forward work for layers a:b on one replica (the gateway pins
                                               every hop of a request; the replica holds its KV)
    parallax.<model>.release                   broadcast: drop the KV/state of finished or aborted requests
    parallax.gateway.<gateway>                 tokens and errors for the requests of one gateway
    parallax.stats                             request: every stage answers with its counters ({"reset": true} zeroes them)
    parallax.metrics                           request: every stage answers with its Prometheus text exposition
    parallax.trace                             request {"id": ...}: every stage answers with its spans of that request
    parallax.stage.<node>                      request: one stage's counters (its nats.micro endpoint, stages/micro.py)

Who is alive and what it serves is not a subject: it is the JetStream KV bucket ``parallax-nodes``
(:mod:`parallax.broker.kv`). Layer indices are global and half-open (``a:b`` serves layers a..b-1).
"""

import re

PREFIX = "parallax"
STATS = f"{PREFIX}.stats"
METRICS = f"{PREFIX}.metrics"
TRACE = f"{PREFIX}.trace"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def token(name: str) -> str:
    """A model or node name as one subject token (no dots, spaces or wildcards)."""
    cleaned = _UNSAFE.sub("_", name).strip("_")
    if not cleaned:
        raise ValueError(f"name {name!r} has no usable characters for a subject")
    return cleaned


def node(model: str, start: int, end: int, node_id: str) -> str:
    return f"{PREFIX}.{token(model)}.layers.{start}-{end}.{token(node_id)}"


def release(model: str) -> str:
    return f"{PREFIX}.{token(model)}.release"


def gateway(gateway_id: str) -> str:
    return f"{PREFIX}.gateway.{token(gateway_id)}"


def stage(node_id: str) -> str:
    return f"{PREFIX}.stage.{token(node_id)}"
