"""The stage engine: one ``step()`` = schedule -> run -> postprocess, backend-independent.

NATS callbacks only ``submit()`` decoded messages (thread-safe deque); ``step()`` runs in one worker
thread and owns all request state. It returns the messages to publish as ``(subject, payload)``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from parallax.broker import subjects
from parallax.broker.wire import DTYPE_SIZES, ErrorMsg, Forward, ForwardItem, Release, RequestMeta, TokenOut, Tokens, encode

from .backend import Backend, SampleSpec, StepItem, StepOutput

log = logging.getLogger(__name__)
Outgoing = list[tuple[str, bytes]]


@dataclass(frozen=True)
class EngineConfig:
    max_tokens_per_step: int = 8192  # rows of one forward (a longer single item still runs alone)
    idle_timeout_s: float = 600.0  # drop a request nobody has touched for this long
    remember_released: int = 100_000  # released ids kept to ignore their late messages

    def __post_init__(self) -> None:
        if self.max_tokens_per_step < 1 or self.idle_timeout_s <= 0 or self.remember_released < 0:
            raise ValueError("max_tokens_per_step and idle_timeout_s must be positive")


@dataclass
class Sequence:
    rid: str
    meta: RequestMeta
    hop: int  # index of this stage in meta.chain
    route: list[str | None]
    length: int = 0  # rows run on this stage
    generated: list[int] = field(default_factory=list)  # last stage only
    touched: float = field(default_factory=time.monotonic)

    @property
    def reply(self) -> str:
        return self.meta.reply


@dataclass
class Work:
    seq: Sequence
    item: ForwardItem
    data: memoryview
    dtype: str


class Engine:
    def __init__(self, backend: Backend, node_id: str, config: EngineConfig | None = None):
        self.backend, self.node_id = backend, node_id
        self.config = config or EngineConfig()
        self.spec = backend.spec
        self.seqs: dict[str, Sequence] = {}
        self._inbox: deque[tuple[Forward | Release, memoryview]] = deque()
        self._released: OrderedDict[str, None] = OrderedDict()

    # --- called from the NATS side -------------------------------------------------------------
    def submit(self, header: Forward | Release, data: memoryview = memoryview(b"")) -> None:
        self._inbox.append((header, data))

    def has_work(self) -> bool:
        return bool(self._inbox)

    @property
    def queued(self) -> int:
        return len(self._inbox)

    # --- the step --------------------------------------------------------------------------------
    def step(self) -> Outgoing:
        out: Outgoing = []
        work = self._schedule(out)
        if work:
            out += self._run(work)
        self._expire(out)
        return out

    def _schedule(self, out: Outgoing) -> list[Work]:
        work: list[Work] = []
        rows = 0
        while self._inbox and (not work or rows + self._rows(self._inbox[0][0]) <= self.config.max_tokens_per_step):
            header, data = self._inbox.popleft()
            if isinstance(header, Release):
                self._release(header.rids, out, broadcast=False)
                continue
            admitted = self._admit(header, data, out)
            work += admitted
            rows += sum(w.item.n for w in admitted)
        return work

    @staticmethod
    def _rows(header: Forward | Release) -> int:
        return sum(i.n for i in header.items) if isinstance(header, Forward) else 0

    def _admit(self, msg: Forward, data: memoryview, out: Outgoing) -> list[Work]:
        problem = self._check_tensor(msg)
        work, offset = [], 0
        row_bytes = len(data) // msg.shape[0]
        for item in msg.items:
            piece = data[offset : offset + item.n * row_bytes]
            offset += item.n * row_bytes
            seq = self._sequence(item, problem, out)
            if seq is not None:
                seq.touched = time.monotonic()
                work.append(Work(seq, item, piece, msg.dtype))
        return work

    def _check_tensor(self, msg: Forward) -> str | None:
        if self.spec.first:
            ok = msg.dtype == "int32" and len(msg.shape) == 1
            return None if ok else f"stage {self._range} takes int32 token ids [T], got {msg.dtype} {list(msg.shape)}"
        ok = msg.dtype != "int32" and len(msg.shape) == 2 and msg.shape[1] == self.spec.hidden_size
        return None if ok else f"stage {self._range} takes hidden states [T, {self.spec.hidden_size}], got {msg.dtype} {list(msg.shape)}"

    def _sequence(self, item: ForwardItem, problem: str | None, out: Outgoing) -> Sequence | None:
        """The request an item belongs to (created by its first message), or None after an error."""
        if item.rid in self._released:
            return None
        seq = self.seqs.get(item.rid)
        if seq is None and item.meta is None:
            log.debug("dropping rows for unknown request %s", item.rid)
            return None
        if seq is None:
            seq, problem = self._new_sequence(item, problem)
        elif item.meta is not None:
            problem = problem or f"request {item.rid} already exists on this stage"
        if seq is not None and item.route is not None:
            seq.route = list(item.route)
        if problem is None and seq is not None and item.pos != seq.length:
            problem = f"request {item.rid}: rows start at {item.pos}, this stage has {seq.length} cached"
        if problem is None and seq is not None and item.pos + item.n > self.spec.max_positions:
            problem = f"request {item.rid} is longer than the model's context of {self.spec.max_positions}"
        if problem is not None:
            self._fail(item.rid, seq.reply if seq else item.meta.reply if item.meta else None, problem, out)
            return None
        return seq

    def _new_sequence(self, item: ForwardItem, problem: str | None) -> tuple[Sequence | None, str | None]:
        meta = item.meta
        hop = next((k for k, r in enumerate(meta.chain) if r == (self.spec.start, self.spec.end)), None)
        if hop is None:
            return None, problem or f"stage {self._range} is not in the request's chain {list(meta.chain)}"
        if (meta.chain[-1][1] != self.spec.num_layers):
            return None, problem or f"chain {list(meta.chain)} does not end at layer {self.spec.num_layers}"
        route = list(meta.route)
        route[hop] = self.node_id
        seq = Sequence(item.rid, meta, hop, route)
        self.seqs[item.rid] = seq
        return seq, problem

    def _run(self, work: list[Work]) -> Outgoing:
        items = [StepItem(w.item.rid, w.item.pos, w.item.n, w.data, w.dtype, self._sample_spec(w)) for w in work]
        try:
            result = self.backend.run(items)
        except Exception as e:  # a bad batch must not kill the stage: fail its requests, keep serving
            log.exception("forward failed for %d requests", len(work))
            out: Outgoing = []
            for w in work:
                self._fail(w.seq.rid, w.seq.reply, f"stage {self._range} failed: {type(e).__name__}: {e}", out)
            return out
        for w in work:
            w.seq.length = w.item.pos + w.item.n
        return self._sampled(work, result) if self.spec.last else self._forwarded(work, result)

    def _sample_spec(self, w: Work) -> SampleSpec | None:
        if not (self.spec.last and w.item.sample):
            return None
        params, done = w.seq.meta.sampling, len(w.seq.generated)
        banned = params.stop_token_ids if done < params.min_tokens else ()
        return SampleSpec(params, w.seq.meta.prompt_ids + tuple(w.seq.generated), tuple(banned), done)

    # --- postprocess -----------------------------------------------------------------------------
    def _forwarded(self, work: list[Work], result: StepOutput) -> Outgoing:
        groups: dict[str, tuple[list[ForwardItem], list[memoryview]]] = {}
        offset = 0
        for w in work:
            size = w.item.n * result.row_bytes
            rows = result.hidden[offset : offset + size]
            offset += size
            items, datas = groups.setdefault(self._next_subject(w.seq), ([], []))
            items.append(self._next_item(w))
            datas.append(rows)
        return [(subject, self._forward_msg(items, datas, result.row_bytes)) for subject, (items, datas) in groups.items()]

    def _next_item(self, w: Work) -> ForwardItem:
        update: dict = {}
        if w.item.meta is not None:
            update["meta"] = w.item.meta.model_copy(update={"route": tuple(w.seq.route)})
        return w.item.model_copy(update=update)

    def _forward_msg(self, items: list[ForwardItem], datas: list[memoryview], row_bytes: int) -> bytes:
        rows = sum(i.n for i in items)
        header = Forward(items=tuple(items), dtype=self.spec.dtype, shape=(rows, row_bytes // DTYPE_SIZES[self.spec.dtype]))
        return encode(header, b"".join(datas))

    def _next_subject(self, seq: Sequence) -> str:
        hop = (seq.hop + 1) % len(seq.meta.chain)
        start, end = seq.meta.chain[hop]
        node = seq.route[hop]
        model = self.spec.model
        return subjects.node(model, start, end, node) if node else subjects.layers(model, start, end)

    def _sampled(self, work: list[Work], result: StepOutput) -> Outgoing:
        tokens = iter(result.tokens)
        replies: dict[str, list[TokenOut]] = {}
        loops: dict[str, list[tuple[ForwardItem, int]]] = {}
        finished: list[str] = []
        for w in work:
            if not w.item.sample:
                continue
            token, seq = next(tokens), w.seq
            seq.generated.append(token)
            index, finish = len(seq.generated) - 1, self._finish(seq, token)
            route = tuple(seq.route) if index == 0 else None
            replies.setdefault(seq.reply, []).append(TokenOut(rid=seq.rid, token=token, index=index, finish=finish, route=route))
            if finish:
                finished.append(seq.rid)
            else:
                item = ForwardItem(rid=seq.rid, pos=seq.length, n=1, route=route)
                loops.setdefault(self._next_subject(seq), []).append((item, token))
        out = [(reply, encode(Tokens(items=tuple(items)))) for reply, items in replies.items()]
        out += [(subject, self._token_msg(pairs)) for subject, pairs in loops.items()]
        self._release(finished, out, broadcast=True)
        return out

    @staticmethod
    def _token_msg(pairs: list[tuple[ForwardItem, int]]) -> bytes:
        ids = b"".join(t.to_bytes(4, "little", signed=True) for _, t in pairs)
        return encode(Forward(items=tuple(i for i, _ in pairs), dtype="int32", shape=(len(pairs),)), ids)

    def _finish(self, seq: Sequence, token: int) -> str | None:
        p = seq.meta.sampling
        if token in p.stop_token_ids and not p.ignore_eos and len(seq.generated) > p.min_tokens:
            return "stop"
        if len(seq.generated) >= p.max_tokens or seq.length + 1 >= self.spec.max_positions:
            return "length"
        return None

    # --- errors, release, expiry -------------------------------------------------------------------
    def _fail(self, rid: str, reply: str | None, message: str, out: Outgoing) -> None:
        log.warning("request %s: %s", rid, message)
        if reply:
            out.append((reply, encode(ErrorMsg(rid=rid, message=message, node=self.node_id))))
        self._release([rid], out, broadcast=True)

    def _release(self, rids, out: Outgoing, broadcast: bool) -> None:
        for rid in rids:
            self.seqs.pop(rid, None)
            self.backend.release(rid)
            self._released[rid] = None
        while len(self._released) > self.config.remember_released:
            self._released.popitem(last=False)
        if broadcast and rids:
            out.append((subjects.release(self.spec.model), encode(Release(rids=tuple(rids)))))

    def _expire(self, out: Outgoing) -> None:
        limit = time.monotonic() - self.config.idle_timeout_s
        stale = [rid for rid, s in self.seqs.items() if s.touched < limit]
        if stale:
            log.warning("dropping %d idle requests", len(stale))
            self._release(stale, out, broadcast=False)

    @property
    def _range(self) -> str:
        return f"{self.spec.start}:{self.spec.end}"

