"""A stage's spans of the requests it serves, in a short in-memory ring (``parallax trace`` reads it).

Every request carries a W3C trace context in the NATS header ``Px-Trace`` of its forward messages
(:mod:`parallax.broker.observe`); a stage learns it from the messages it receives and names it again,
as a child span, on the messages it sends on. Per request it records:

    hop      the sender's publish -> this stage's receipt (both wall clocks: across machines, as good
             as their clock sync)
    queue    receipt -> the step that runs the rows starts
    compute  that step (its whole batch), with the request's rows
    send     publishing the message that carries the request's output (forward rows or tokens)

The worker answers ``parallax.trace`` requests (``{"id": <request id or trace id>}``) with
:meth:`TraceRecorder.answer`; ``export`` also sends every span elsewhere (OpenTelemetry:
:mod:`parallax.stages.otel`). The engine's step observer runs in the compute thread; a lock keeps
the ring consistent for the event loop that reads it.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import orjson

from parallax.broker.observe import TraceContext, parse_trace_header, trace_header
from parallax.broker.wire import MAGIC, Forward

log = logging.getLogger(__name__)
SPAN_RING = 20_000  # spans kept per stage (a 100-token request on a stage: ~300)
TRACED_REQUESTS = 10_000  # request ids whose trace context a stage remembers
_LEN = struct.Struct(">I")


@dataclass(frozen=True)
class Span:
    rid: str  # the try's id (``rid``, ``rid~1`` after a resubmission)
    trace_id: str
    kind: str  # hop, queue, compute, send
    start: float  # wall clock, seconds
    end: float
    rows: int = 0  # compute: the request's rows in the step


# Sends one span elsewhere: (the span, the trace context its request came with, the stage's labels).
SpanExport = Callable[[Span, TraceContext, Mapping[str, str]], None]


class TraceRecorder:
    def __init__(self, labels: Mapping[str, str] | None = None, export: SpanExport | None = None,
                 capacity: int = SPAN_RING, remember: int = TRACED_REQUESTS):
        self.labels = dict(labels or {})  # who records (model, layers, node): for an export
        self.export = export
        self._spans: deque[Span] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._traces: OrderedDict[str, TraceContext] = OrderedDict()
        self._remember = remember
        self._arrived: dict[str, float] = {}  # rid -> when rows came that no step has run yet

    def received(self, header: Forward, headers: dict[str, str] | None, now: float) -> None:
        """A forward message came (in the event loop)."""
        for rid, ctx in parse_trace_header(headers).items():
            self._traces[rid] = ctx
            self._traces.move_to_end(rid)
        while len(self._traces) > self._remember:
            self._arrived.pop(self._traces.popitem(last=False)[0], None)
        spans = []
        for item in header.items:
            ctx = self._traces.get(item.rid)
            if ctx is None:
                continue
            self._arrived.setdefault(item.rid, now)
            if header.sent is not None:
                spans.append(Span(item.rid, ctx.trace_id, "hop", header.sent, max(header.sent, now)))
        self._add(spans)

    def step(self, items: Sequence[tuple[str, int]], started: float, seconds: float) -> None:
        """An engine step observer (in the compute thread)."""
        spans = []
        for rid, rows in items:
            ctx = self._traces.get(rid)
            if ctx is None:
                continue
            arrived = self._arrived.pop(rid, None)
            if arrived is not None:
                spans.append(Span(rid, ctx.trace_id, "queue", arrived, max(arrived, started)))
            spans.append(Span(rid, ctx.trace_id, "compute", started, started + seconds, rows))
        self._add(spans)

    def outgoing(self, payload: bytes) -> tuple[list[str], dict[str, str]]:
        """The traced requests of a message about to be published, and the NATS headers that carry
        their trace on (forward messages only; the gateway needs none)."""
        kind, rids = message_rids(payload)
        traced = {rid: ctx for rid in rids if (ctx := self._traces.get(rid)) is not None}
        return list(traced), trace_header({rid: ctx.child() for rid, ctx in traced.items()}) if kind == "fwd" else {}

    def sent(self, rids: Iterable[str], start: float, end: float) -> None:
        self._add([Span(rid, ctx.trace_id, "send", start, end) for rid in rids
                   if (ctx := self._traces.get(rid)) is not None])

    def forget(self, rids: Iterable[str]) -> None:
        """Requests released: rows that may still come for them start no queue span."""
        for rid in rids:
            self._arrived.pop(rid, None)

    def spans(self, wanted: str) -> list[Span]:
        """The spans of request ``wanted`` (each of its tries) or of trace ``wanted``."""
        with self._lock:
            spans = list(self._spans)
        return [s for s in spans if s.rid == wanted or s.rid.startswith(wanted + "~") or s.trace_id == wanted]

    def answer(self, query: bytes, stage: dict, limit: int) -> bytes:
        """The reply to a ``parallax.trace`` request: ``stage`` (who answers) plus the matching spans,
        the latest that fit in ``limit`` bytes (``dropped``: how many earlier ones did not), or an
        error for a malformed query."""
        try:
            wanted = orjson.loads(query).get("id")
        except (orjson.JSONDecodeError, AttributeError):
            wanted = None
        if not isinstance(wanted, str) or not wanted:
            return orjson.dumps(stage | {"error": 'a trace query is {"id": "<request id or trace id>"}'})
        spans = [asdict(s) for s in self.spans(wanted)]
        body = orjson.dumps(stage | {"spans": spans, "dropped": 0})
        dropped = 0
        while len(body) > limit and spans:
            keep = min(len(spans) - 1, len(spans) * limit // len(body) - 1)  # about what fits, then check
            dropped += len(spans) - max(0, keep)
            spans = spans[len(spans) - max(0, keep):]
            body = orjson.dumps(stage | {"spans": spans, "dropped": dropped})
        return body

    def _add(self, spans: list[Span]) -> None:
        if not spans:
            return
        with self._lock:
            self._spans.extend(spans)
        if self.export is None:
            return
        try:
            for span in spans:
                if (ctx := self._traces.get(span.rid)) is not None:
                    self.export(span, ctx, self.labels)
        except Exception as e:  # an exporter's failure must not fail a step: stop exporting
            log.warning("span export failed, exporting no more: %s: %s", type(e).__name__, e)
            self.export = None


def message_rids(payload: bytes) -> tuple[str, list[str]]:
    """A wire message's kind and the request ids of its items, from its JSON header alone (no
    validation: the engine built it). ``("", [])`` for anything else."""
    if len(payload) < 8 or payload[:4] != MAGIC:
        return "", []
    (size,) = _LEN.unpack_from(payload, 4)
    try:
        head = orjson.loads(payload[8 : 8 + size])
    except orjson.JSONDecodeError:
        return "", []
    return head.get("kind", ""), [item["rid"] for item in head.get("items", ())]
