"""The gateway's Prometheus metrics, under vLLM's names with the ``parallax:`` prefix.

``vllm:time_to_first_token_seconds`` is ``parallax:time_to_first_token_seconds`` here, and so on,
so a vLLM dashboard adapts by changing the prefix. Every series has the ``model_name`` label (as
vLLM's). A :class:`RequestTimer` follows one request: waiting until its first token, running after,
ended with its ``finished_reason`` (``stop``, ``length``, or ``abort`` when it ended without one:
an error, a cancel, a client gone). :func:`merge_expositions` joins the stages' own expositions
(gathered over NATS) with the gateway's into one valid exposition (one family per name).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0, 640.0)  # vLLM's TTFT buckets
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
ABORT = "abort"  # the finished_reason of a request that ended without a stop or length

disable_created_metrics()  # no *_created series: a timestamp per counter is noise for dashboards


class GatewayMetrics:
    """The series of one gateway app (its own registry: several apps may live in one process)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = r = CollectorRegistry()
        label = ("model_name",)
        self.ttft = Histogram("parallax:time_to_first_token_seconds", "Time to the first token of a request", label,
                              buckets=LATENCY_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("parallax:inter_token_latency_seconds", "Time between two tokens of a request", label,
                             buckets=TOKEN_BUCKETS, registry=r).labels(model_name)
        self.tpot = Histogram("parallax:time_per_output_token_seconds", "A request's mean time per token after its first",
                              label, buckets=TOKEN_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("parallax:e2e_request_latency_seconds", "Time from a request's arrival to its end", label,
                             buckets=E2E_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Counter("parallax:prompt_tokens", "Prompt tokens of the requests sent to the stages",
                                     label, registry=r).labels(model_name)
        self.generation_tokens = Counter("parallax:generation_tokens", "Tokens generated", label,
                                         registry=r).labels(model_name)
        self._success = Counter("parallax:request_success", "Requests ended, by finished_reason (abort: without a stop "
                                "or length: an error, a cancel, a client gone)", ("model_name", "finished_reason"),
                                registry=r)
        self.running = Gauge("parallax:num_requests_running", "Requests streaming tokens", label,
                             registry=r).labels(model_name)
        self.waiting = Gauge("parallax:num_requests_waiting", "Requests waiting for their first token", label,
                             registry=r).labels(model_name)
        for reason in ("stop", "length", ABORT):  # present from the start: rate() needs the zero
            self._success.labels(model_name, reason)

    def request(self, prompt_tokens: int) -> "RequestTimer":
        """A request is sent to the stages now."""
        self.prompt_tokens.inc(prompt_tokens)
        return RequestTimer(self)

    def ended(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """One request's clock: waiting -> (first token) running -> ended (once)."""

    def __init__(self, metrics: GatewayMetrics):
        self.metrics = metrics
        self.arrived = self.first = self.last = time.perf_counter()
        self.tokens = 0
        self.done = False
        metrics.waiting.inc()

    def token(self) -> None:
        now = time.perf_counter()
        m = self.metrics
        if self.tokens == 0:
            self.first = now
            m.ttft.observe(now - self.arrived)
            m.waiting.dec()
            m.running.inc()
        else:
            m.itl.observe(now - self.last)
        self.tokens += 1
        self.last = now
        m.generation_tokens.inc()

    def end(self, reason: str | None) -> None:
        """The request is over (``reason``: its finish, None for ``abort``); later calls do nothing."""
        if self.done:
            return
        self.done = True
        m = self.metrics
        (m.running if self.tokens else m.waiting).dec()
        m.e2e.observe(time.perf_counter() - self.arrived)
        if self.tokens > 1:  # vLLM's TPOT: the decode time over the tokens after the first
            m.tpot.observe((self.last - self.first) / (self.tokens - 1))
        m.ended(reason or ABORT)


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]):
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_expositions(texts: Iterable[bytes | str]) -> bytes:
    """One exposition of every series in ``texts`` (Prometheus text format): families of the same
    name are joined, so several stages' ``parallax:stage_step_seconds`` make one family. A text that
    does not parse is skipped."""
    families: dict[str, Metric] = {}
    for text in texts:
        try:
            parsed = list(text_string_to_metric_families(text.decode() if isinstance(text, bytes) else text))
        except (ValueError, UnicodeDecodeError):
            continue
        for family in parsed:
            into = families.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            into.samples.extend(family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))
    return generate_latest(registry)
