"""A stage's Prometheus metrics: one :class:`StageMetrics` per engine, labelled model + layers + node.

Histograms are observed as things happen (a step, a hop, a message); the state of the engine (KV
blocks, requests held, prefix hits, preemptions) is read when a scrape collects. The worker answers
``parallax.metrics`` over NATS with :meth:`StageMetrics.exposition`, so the gateway's
``/metrics?cluster=1`` and ``parallax metrics`` see every stage without opening a port on it;
``--metrics-port`` serves every stage of the process over HTTP too (:func:`metrics_port`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

from prometheus_client import (
    CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest, start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .engine import Engine, Stats

LABELS = ("model", "layers", "node")
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
HOP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

disable_created_metrics()  # no *_created series: a timestamp per counter is noise for dashboards


class StageMetrics(Collector):
    """The series of one stage (an engine serving one layer range)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        spec = engine.spec
        self.labels = (spec.model, f"{spec.start}:{spec.end}", engine.node_id)
        self.registry = CollectorRegistry(auto_describe=False)
        self._step = Histogram("parallax:stage_step_seconds", "Time of one forward step (all its rows)", LABELS,
                               buckets=STEP_BUCKETS, registry=self.registry).labels(*self.labels)
        self._rows = Histogram("parallax:stage_batch_rows", "Rows (prefill + decode) in one forward step", LABELS,
                               buckets=ROW_BUCKETS, registry=self.registry).labels(*self.labels)
        self._hop = Histogram("parallax:stage_hop_latency_seconds", "From the sender's publish to this stage's receipt",
                              LABELS, buckets=HOP_BUCKETS, registry=self.registry).labels(*self.labels)
        self._in = Counter("parallax:stage_nats_received_bytes", "Bytes of work received over NATS", LABELS,
                           registry=self.registry).labels(*self.labels)
        self._out = Counter("parallax:stage_nats_sent_bytes", "Bytes published over NATS", LABELS,
                            registry=self.registry).labels(*self.labels)
        self._base = Stats()  # counters zeroed by a parallax.stats reset, kept here so ours never go back
        self.registry.register(self)

    # --- observed as it happens ----------------------------------------------------------------------
    def step(self, items: Sequence[tuple[str, int]], started: float, seconds: float) -> None:
        """An engine step observer (:attr:`Engine.observers`)."""
        self._step.observe(seconds)
        self._rows.observe(sum(n for _, n in items))

    def hop(self, seconds: float) -> None:
        self._hop.observe(seconds)

    def received(self, size: int) -> None:
        self._in.inc(size)

    def sent(self, size: int) -> None:
        self._out.inc(size)

    def absorb(self, stats: Stats) -> None:
        """The engine's counters are about to be zeroed (a stats reset): keep what they counted."""
        self._base.prefix_hit_tokens += stats.prefix_hit_tokens
        self._base.preempted += stats.preempted

    # --- read at scrape time -------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        e, stats, blocks = self.engine, self.engine.stats, self.engine.blocks
        gauges = (
            ("parallax:stage_kv_blocks_used", "KV blocks held by requests", blocks.used),
            ("parallax:stage_kv_blocks_cached", "KV blocks of finished prompts kept for prefix reuse", blocks.cached),
            ("parallax:stage_kv_blocks_total", "KV blocks in the pool", blocks.num_blocks),
            ("parallax:kv_cache_usage_perc", "Fraction of the KV pool held by requests (0..1)",
             blocks.used / blocks.num_blocks),
            ("parallax:stage_num_requests_running", "Requests with KV on this stage", len(e.seqs)),
            ("parallax:stage_num_requests_waiting", "Requests and messages waiting for the engine", e.queued),
        )
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc, labels=LABELS)
            family.add_metric(self.labels, value)
            yield family
        counters = (
            ("parallax:prefix_cache_hits", "Prompt tokens served from the prefix cache",
             self._base.prefix_hit_tokens + stats.prefix_hit_tokens),
            ("parallax:num_preemptions", "Requests handed back because the KV pool was full",
             self._base.preempted + stats.preempted),
        )
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc, labels=LABELS)
            family.add_metric(self.labels, value)
            yield family

    def exposition(self) -> bytes:
        """The Prometheus text format of every series of this stage."""
        return generate_latest(self.registry)


# --- the process's stages, for --metrics-port ------------------------------------------------------
_serving: set[StageMetrics] = set()
_serving_lock = threading.Lock()


def serving(metrics: StageMetrics, on: bool) -> None:
    """Add (a stage starts serving) or remove (it stops) a stage from what :func:`metrics_port` serves."""
    with _serving_lock:
        (_serving.add if on else _serving.discard)(metrics)


class _Serving(Collector):
    def collect(self) -> Iterator[Metric]:
        with _serving_lock:
            stages = list(_serving)
        for stage in stages:
            yield from stage.registry.collect()


@contextlib.contextmanager
def metrics_port(port: int | None, host: str = "0.0.0.0") -> Iterator[None]:
    """While inside, serve the series of every stage of this process on ``http://host:port/metrics``
    (a daemon thread; nothing when ``port`` is None). OSError when the port is taken."""
    if port is None:
        yield
        return
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Serving())
    server, thread = start_http_server(port, host, registry=registry)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
