"""The stage engine: one ``step()`` = schedule -> run -> postprocess, backend-independent.

NATS callbacks only ``submit()`` decoded messages (a thread-safe deque); ``step()`` runs in one
worker thread and owns all request state. It returns the messages to publish as (subject, payload).

Every step runs ONE forward over all ready work: decode rows first (one per request), then prefill
chunks, within ``max_batch_size`` items and ``max_tokens_per_step`` rows. Requests join as soon as
their KV blocks can be allocated and leave when they finish; nobody waits for a batch to drain.
The first stage cuts prompts into chunks; later stages run the chunks as they come. When the KV
pool is full, new requests wait (FIFO); a running request that cannot grow preempts the newest one,
which the gateway resubmits (prompt + tokens so far) and which is recomputed later.

KV lives in one block pool per KV group (``blocks.KVSpace``): a stage's full-attention layers keep every
position, each sliding window's layers only the window (a request gives back the blocks no later row of it
reads, after every step). A stage with one kind of layer has one group.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field

from parallax.broker import subjects
from parallax.broker.wire import (
    DTYPE_SIZES, ErrorCode, ErrorMsg, Finish, Forward, ForwardItem, Logprobs, Release, RequestMeta, TokenOut, Tokens,
    encode,
)

from parallax.broker.errors import GrammarError

from .backend import Backend, PromptScore, SampleSpec, StepItem, StepOutput
from .blocks import KVSpace, Prefix, Tables, kv_groups, split_blocks
from .grammar import Constraint, Grammars

log = logging.getLogger(__name__)
Outgoing = list[tuple[str, bytes]]
# Told of every forward that ran: (rid, rows) per item, wall clock when it started, its seconds (metrics, traces).
StepObserver = Callable[[Seq[tuple[str, int]], float, float], None]


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 256  # items (requests) in one forward
    max_tokens_per_step: int = 512  # rows in one forward (a longer single item still runs alone)
    chunk_tokens: int = 512  # prompt chunk on the first stage (the worker also fits it to max_payload)
    block_size: int = 16  # positions per KV block
    kv_blocks: int = 1024  # KV budget in blocks of every layer (the CLI derives it from memory): ``split_blocks``
    prefix_cache: bool = True
    idle_timeout_s: float = 600.0  # drop a request nobody has touched for this long
    remember_released: int = 100_000  # released ids kept to ignore their late messages

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_tokens_per_step", "chunk_tokens", "block_size", "kv_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.idle_timeout_s <= 0 or self.remember_released < 0:
            raise ValueError("idle_timeout_s must be positive")


@dataclass
class Work:
    item: ForwardItem
    data: memoryview
    dtype: str


@dataclass
class Sequence:
    rid: str
    meta: RequestMeta
    hop: int  # index of this stage in meta.chain (meta.route pins the replica of every hop)
    kv: Tables  # KV blocks of each KV group, in position order
    length: int = 0  # rows whose KV is in the pool
    inbox: deque[Work] = field(default_factory=deque)  # rows received, not yet run
    pending: memoryview | None = None  # first stage: prompt ids (int32) not yet sent into a chunk
    meta_sent: bool = False  # first stage: the first chunk (carrying meta) has been scheduled
    registered: int = 0  # blocks already in the prefix cache
    generated: list[int] = field(default_factory=list)  # last stage only
    constraint: Constraint | None = None  # last stage: the structured output's matcher
    prompt_logprobs: list[Logprobs] = field(default_factory=list)  # last stage: scored so far, sent with the first token
    touched: float = field(default_factory=time.monotonic)

    @property
    def reply(self) -> str:
        return self.meta.reply


@dataclass
class Stats:
    steps: int = 0
    rows: int = 0
    busy_s: float = 0.0
    prefix_hit_tokens: int = 0
    preempted: int = 0
    requests: int = 0  # requests admitted (each try of a resubmitted request counts)
    errors: dict[str, int] = field(default_factory=dict)  # requests failed here, by error code (preempted included)


class Engine:
    def __init__(self, backend: Backend, node_id: str, config: EngineConfig | None = None,
                 grammars: Grammars | None = None):
        self.backend, self.node_id = backend, node_id
        self.grammars = grammars  # compiles structured-output grammars (last stage); None: such requests are refused
        self.config = config or EngineConfig()
        self.spec = backend.spec
        c = self.config
        groups = kv_groups(backend.kv_windows)
        sizes = split_blocks(groups, c.kv_blocks, c.block_size, c.max_batch_size, c.max_tokens_per_step)
        self.blocks = KVSpace(groups, sizes, c.block_size, c.prefix_cache)
        backend.init_kv(sizes[0], c.block_size, sizes[1:])
        self.seqs: dict[str, Sequence] = {}  # in admission order: the newest is preempted first
        self.waiting: OrderedDict[str, list[Work]] = OrderedDict()
        self.stats = Stats()
        self._inbox: deque[tuple[Forward | Release, memoryview]] = deque()
        self._released: OrderedDict[str, None] = OrderedDict()
        self.chunk_tokens = self.config.chunk_tokens
        self.draining: str | None = None  # set (the reason) while the stage drains: new requests are refused
        self.observers: list[StepObserver] = []

    # --- called from the NATS side -------------------------------------------------------------
    def submit(self, header: Forward | Release, data: memoryview = memoryview(b"")) -> None:
        self._inbox.append((header, data))

    def has_work(self) -> bool:
        return bool(self._inbox) or any(s.inbox or s.pending for s in self.seqs.values())

    @property
    def idle(self) -> bool:
        """No request is held, waiting or on its way in."""
        return not self.seqs and not self.waiting and not self._inbox

    @property
    def queued(self) -> int:
        return len(self._inbox) + len(self.waiting)

    # --- the step --------------------------------------------------------------------------------
    def step(self) -> Outgoing:
        out: Outgoing = []
        self._drain(out)
        self._admit(out)
        work = self._schedule(out)
        if work:
            out += self._run(work)
        self._expire(out)
        return out

    def _drain(self, out: Outgoing) -> None:
        while self._inbox:
            header, data = self._inbox.popleft()
            if isinstance(header, Release):
                self._release(header.rids, out, broadcast=False)
                continue
            problem = self._check_tensor(header)
            row_bytes = len(data) // header.shape[0]
            offset = 0
            for item in header.items:
                piece = data[offset : offset + item.n * row_bytes]
                offset += item.n * row_bytes
                self._route_item(Work(item, piece, header.dtype), problem, out)

    def _route_item(self, work: Work, problem: str | None, out: Outgoing) -> None:
        item = work.item
        if item.rid in self._released:
            return
        if problem is not None:
            return self._fail(item.rid, self._reply_for(item), problem, out)
        seq = self.seqs.get(item.rid)
        if seq is not None:
            if item.meta is not None:
                return self._fail(item.rid, seq.reply, f"request {item.rid} already exists on this stage", out)
            seq.inbox.append(work)
            seq.touched = time.monotonic()
        elif item.meta is not None and item.rid not in self.waiting and self.draining is not None:
            self._fail(item.rid, item.meta.reply, self.draining, out, "draining")
        elif item.meta is not None or item.rid in self.waiting:
            self.waiting.setdefault(item.rid, []).append(work)
        else:
            log.debug("dropping rows for unknown request %s", item.rid)

    def _check_tensor(self, msg: Forward) -> str | None:
        if self.spec.first:
            ok = msg.dtype == "int32" and len(msg.shape) == 1
            return None if ok else f"stage {self._range} takes int32 token ids [T], got {msg.dtype} {list(msg.shape)}"
        ok = msg.dtype != "int32" and len(msg.shape) == 2 and msg.shape[1] == self.spec.hidden_size
        return None if ok else f"stage {self._range} takes hidden states [T, {self.spec.hidden_size}], got {msg.dtype} {list(msg.shape)}"

    # --- admission -------------------------------------------------------------------------------
    def _admit(self, out: Outgoing) -> None:
        while self.waiting:
            rid, works = next(iter(self.waiting.items()))
            first = works[0].item
            problem = self._check_new(first)
            if problem is not None:
                del self.waiting[rid]
                self._fail(rid, first.meta.reply, problem[1], out, problem[0])
                continue
            prefix = self._reusable(first)
            if prefix is None:
                del self.waiting[rid]
                self._fail(rid, first.meta.reply, f"stage {self._range} no longer caches the prompt's prefix", out, "prefix_miss")
                continue
            total = len(first.meta.prompt_ids)
            if not self.blocks.can_allocate(total, prefix, self.chunk_tokens):
                if not self.seqs:  # nothing running will free blocks: it can never fit
                    del self.waiting[rid]
                    self._fail(rid, first.meta.reply, f"a prompt of {total} tokens does not fit in this stage's KV cache "
                               f"({self.blocks.num_blocks * self.blocks.block_size} tokens)", out, "no_memory")
                    continue
                return  # FIFO: wait until running requests free blocks
            del self.waiting[rid]
            try:
                constraint = self._constraint(first.meta)
            except GrammarError as e:
                self._fail(rid, first.meta.reply, str(e), out)
                continue
            self._start(works, self.blocks.allocate(total, prefix, self.chunk_tokens), prefix.tokens, constraint)

    def _constraint(self, meta: RequestMeta) -> Constraint | None:
        """The last stage's matcher for a structured output, over the tokens generated before a resubmission."""
        grammar = meta.sampling.grammar
        if grammar is None or not self.spec.last:
            return None
        if self.grammars is None:
            raise GrammarError(f"stage {self._range} cannot constrain output: it has no tokenizer")
        replay = meta.prompt_ids[len(meta.prompt_ids) - grammar.replay :] if grammar.replay else ()
        return self.grammars.constraint(meta.sampling, replay)

    def _check_new(self, item: ForwardItem) -> tuple[ErrorCode, str] | None:
        meta = item.meta
        if (self.spec.start, self.spec.end) not in meta.chain:
            return "bad_request", f"stage {self._range} is not in the request's chain {[list(r) for r in meta.chain]}"
        if meta.chain[-1][1] != self.spec.num_layers:
            return "bad_request", f"chain {[list(r) for r in meta.chain]} does not end at layer {self.spec.num_layers}"
        pinned = meta.route[meta.chain.index((self.spec.start, self.spec.end))]
        if pinned != self.node_id:
            return "bad_request", f"the request's route pins layers {self._range} to {pinned}, not to {self.node_id}"
        if any(token >= self.spec.vocab_size for token, _ in meta.sampling.logit_bias):
            return "bad_request", f"logit_bias names a token id outside the vocabulary (0..{self.spec.vocab_size - 1})"
        if meta.sampling.first_index >= len(meta.prompt_ids):
            return "bad_request", f"token_offset {meta.sampling.first_index} is not within the prompt of {len(meta.prompt_ids)} tokens"
        if len(meta.prompt_ids) + 1 > self.spec.max_positions:
            return "bad_request", f"the prompt is longer than the model's context of {self.spec.max_positions}"
        if self.spec.first and (item.pos != 0 or item.n != len(meta.prompt_ids)):
            return "bad_request", "the first stage takes the whole prompt at position 0"
        return None

    def _reusable(self, item: ForwardItem) -> Prefix | None:
        """The prompt's cached prefix to share; None when a later stage lacks what the first stage
        skipped (``item.pos`` rows). A request that asks for prompt logprobs computes them all."""
        prompt = item.meta.prompt_ids
        if not item.meta.prefix_cache or item.meta.sampling.prompt_logprobs is not None:
            return self.blocks.no_prefix if item.pos == 0 else None
        if self.spec.first:
            return self.blocks.cached_prefix(prompt, len(prompt) - 1)  # the last token always runs
        hit = self.blocks.cached_prefix(prompt, item.pos)
        return hit if hit.tokens == item.pos else None

    def _start(self, works: list[Work], tables: Tables, cached: int, constraint: Constraint | None) -> None:
        item = works[0].item
        meta = item.meta
        hop = meta.chain.index((self.spec.start, self.spec.end))
        seq = Sequence(item.rid, meta, hop, tables, length=cached, constraint=constraint)
        seq.registered = cached // self.blocks.block_size
        self.stats.prefix_hit_tokens += cached
        self.stats.requests += 1
        if self.spec.first:
            seq.pending = works[0].data[cached * 4 :]
            works = works[1:]
        seq.inbox.extend(works)
        self.seqs[seq.rid] = seq

    # --- scheduling ------------------------------------------------------------------------------
    def _schedule(self, out: Outgoing) -> list[tuple[Sequence, Work]]:
        batch: dict[str, tuple[Sequence, Work]] = {}
        rows = 0
        for seq in list(self.seqs.values()):  # decode rows first, oldest request first
            if len(batch) >= self.config.max_batch_size:
                break
            if seq.rid not in self.seqs:  # preempted a moment ago, in this loop
                continue
            if seq.inbox and seq.inbox[0].item.n == 1 and self._grow(seq, seq.length + 1, out):
                if self._in_order(seq, seq.inbox[0], out):
                    batch[seq.rid] = (seq, seq.inbox.popleft())
                    rows += 1
        for seq in list(self.seqs.values()):  # then prefill chunks
            budget = self.config.max_tokens_per_step - rows
            if len(batch) >= self.config.max_batch_size or (budget <= 0 and batch):
                break
            if seq.rid in batch or seq.rid not in self.seqs:
                continue
            work = self._next_chunk(seq, budget if batch else self.config.max_tokens_per_step)
            if work is not None and self._in_order(seq, work, out) and self._grow(seq, work.item.pos + work.item.n, out):
                batch[seq.rid] = (seq, work)
                rows += work.item.n
        return [(s, w) for s, w in batch.values() if s.rid in self.seqs]  # preemption may have dropped some

    def _in_order(self, seq: Sequence, work: Work, out: Outgoing) -> bool:
        if work.item.pos == seq.length:
            return True
        self._fail(seq.rid, seq.reply, f"request {seq.rid}: rows start at {work.item.pos}, this stage has {seq.length}", out)
        return False

    def fit_payload(self, max_payload: int) -> None:
        """Cut prompts so that one chunk's activations fit in one NATS message."""
        row = self.spec.hidden_size * DTYPE_SIZES[self.spec.dtype]
        self.chunk_tokens = max(self.config.block_size, min(self.config.chunk_tokens, (max_payload - (64 << 10)) // row))

    def _next_chunk(self, seq: Sequence, budget: int) -> Work | None:
        if seq.pending:  # first stage: cut the next chunk of the prompt
            n = min(len(seq.pending) // 4, budget, self.chunk_tokens)
            data, seq.pending = seq.pending[: n * 4], seq.pending[n * 4 :]
            meta = None if seq.meta_sent else seq.meta
            seq.meta_sent = True
            item = ForwardItem(rid=seq.rid, pos=seq.length, n=n, meta=meta, sample=not seq.pending)
            return Work(item, data, "int32")
        head = seq.inbox[0] if seq.inbox else None
        if head is not None and head.item.n > 1 and (head.item.n <= budget or budget >= self.config.max_tokens_per_step):
            return seq.inbox.popleft()
        return None

    def _grow(self, seq: Sequence, rows: int, out: Outgoing) -> bool:
        """Make room for ``rows`` rows of ``seq``, preempting the newest requests if needed."""
        while not self.blocks.can_grow(seq.kv, rows):
            victim = next(reversed(self.seqs.values()))  # the newest
            self.stats.preempted += 1
            self._fail(victim.rid, victim.reply, f"preempted on stage {self._range}: KV cache full", out, "preempted")
            if victim is seq:
                return False
        self.blocks.grow(seq.kv, rows)
        return True

    # --- run -------------------------------------------------------------------------------------
    def _run(self, batch: list[tuple[Sequence, Work]]) -> Outgoing:
        groups = len(self.blocks.groups) > 1
        items = [StepItem(w.item.rid, w.item.pos, w.item.n, w.data, w.dtype, self._sample_spec(s, w), tuple(s.kv.tables[0]),
                          w.item.pos < len(s.meta.prompt_ids), tuple(map(tuple, s.kv.tables[1:])) if groups else (),
                          self._score(s, w))
                 for s, w in batch]
        started, wall = time.perf_counter(), time.time()
        try:
            result = self.backend.run(items)
        except Exception as e:  # a bad batch must not kill the stage: fail its requests, keep serving
            log.exception("forward failed for %d requests", len(batch))
            out: Outgoing = []
            for s, _ in batch:
                self._fail(s.rid, s.reply, f"stage {self._range} failed: {type(e).__name__}: {e}", out, "internal")
            return out
        seconds = time.perf_counter() - started
        self.stats.busy_s += seconds
        for observe in self.observers:
            observe([(w.item.rid, w.item.n) for _, w in batch], wall, seconds)
        self.stats.steps += 1
        self.stats.rows += sum(w.item.n for _, w in batch)
        for s, w in batch:
            s.length = w.item.pos + w.item.n
            s.touched = time.monotonic()
            s.registered = self.blocks.computed(s.kv, s.meta.prompt_ids, s.registered, s.length)
        return self._sampled(batch, result) if self.spec.last else self._forwarded(batch, result)

    def _sample_spec(self, seq: Sequence, w: Work) -> SampleSpec | None:
        if not (self.spec.last and w.item.sample):
            return None
        params = seq.meta.sampling
        history = seq.meta.prompt_ids + tuple(seq.generated) if params.repetition_penalty != 1.0 else ()
        counted = params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
        return SampleSpec(params, history, len(seq.generated), seq.constraint, _output(seq) if counted else ())

    def _score(self, seq: Sequence, w: Work) -> PromptScore | None:
        """The last stage's prompt logprobs of a prompt chunk: row j predicts prompt token pos + j + 1."""
        top = seq.meta.sampling.prompt_logprobs
        if top is None or not self.spec.last or w.item.pos >= len(seq.meta.prompt_ids):
            return None
        return PromptScore(seq.meta.prompt_ids[w.item.pos + 1 : w.item.pos + w.item.n + 1], top)

    # --- postprocess -----------------------------------------------------------------------------
    def _forwarded(self, batch: list[tuple[Sequence, Work]], result: StepOutput) -> Outgoing:
        groups: dict[str, tuple[list[ForwardItem], list[memoryview]]] = {}
        offset = 0
        for seq, w in batch:
            size = w.item.n * result.row_bytes
            items, datas = groups.setdefault(self._next_subject(seq), ([], []))
            items.append(w.item)
            datas.append(result.hidden[offset : offset + size])
            offset += size
        width = result.row_bytes // DTYPE_SIZES[self.spec.dtype]
        return [(subject, self._forward_msg(items, datas, (sum(i.n for i in items), width), self.spec.dtype))
                for subject, (items, datas) in groups.items()]

    @staticmethod
    def _forward_msg(items: list[ForwardItem], datas: list[memoryview], shape: tuple[int, ...], dtype: str) -> bytes:
        header = Forward(items=tuple(items), dtype=dtype, shape=shape, sent=time.time())
        return encode(header, b"".join(datas))

    def _next_subject(self, seq: Sequence) -> str:
        hop = (seq.hop + 1) % len(seq.meta.chain)
        return subjects.node(self.spec.model, *seq.meta.chain[hop], seq.meta.route[hop])

    def _loops_here(self, seq: Sequence) -> bool:
        """Whether the request's next hop is this very stage (its chain has one hop): the generated
        token then goes straight into its inbox instead of a round trip through NATS."""
        return len(seq.meta.chain) == 1 and seq.meta.route[0] == self.node_id

    def _sampled(self, batch: list[tuple[Sequence, Work]], result: StepOutput) -> Outgoing:
        tokens = iter(result.tokens)
        logprobs = iter(result.logprobs or [None] * len(result.tokens))
        for (seq, _), scored in zip(batch, result.prompt_logprobs):
            seq.prompt_logprobs += scored or ()
        replies: dict[str, list[TokenOut]] = {}
        loops: dict[str, tuple[list[ForwardItem], list[memoryview]]] = {}
        finished: list[str] = []
        broken: list[tuple[Sequence, str]] = []  # requests whose token broke their grammar
        for seq, w in batch:
            if not w.item.sample:
                continue
            token, logprob = next(tokens), next(logprobs)
            if not self._advance(seq, token, broken):
                continue
            seq.generated.append(token)
            index, finish = len(seq.generated) - 1, self._finish(seq, token)
            out_token = TokenOut(rid=seq.rid, token=token, index=index, finish=finish, logprobs=logprob,
                                 prompt_logprobs=self._prompt_logprobs(seq) if index == 0 else None)
            replies.setdefault(seq.reply, []).append(out_token)
            if finish:
                finished.append(seq.rid)
            elif self._loops_here(seq):  # a one-stage chain: the token is this stage's next input
                seq.inbox.append(Work(ForwardItem(rid=seq.rid, pos=seq.length, n=1), _ids(token), "int32"))
            else:
                items, ids = loops.setdefault(self._next_subject(seq), ([], []))
                items.append(ForwardItem(rid=seq.rid, pos=seq.length, n=1))
                ids.append(_ids(token))
        # the first stage's next input first: it is on the critical path of every request, the gateway's copy is not
        out = [(subject, self._forward_msg(items, ids, (len(items),), "int32")) for subject, (items, ids) in loops.items()]
        out += [(reply, encode(Tokens(items=tuple(items)))) for reply, items in replies.items()]
        self._release(finished, out, broadcast=True)
        for seq, message in broken:
            self._fail(seq.rid, seq.reply, message, out, "internal")
        return out

    @staticmethod
    def _prompt_logprobs(seq: Sequence) -> tuple[Logprobs, ...] | None:
        if seq.meta.sampling.prompt_logprobs is None:
            return None
        scored, seq.prompt_logprobs = tuple(seq.prompt_logprobs), []
        return scored

    @staticmethod
    def _advance(seq: Sequence, token: int, broken: list[tuple[Sequence, str]]) -> bool:
        """Move the request's grammar over its sampled token (the mask makes this always fit)."""
        if seq.constraint is None:
            return True
        try:
            seq.constraint.accept(token)
            return True
        except GrammarError as e:
            broken.append((seq, str(e)))
            return False

    def evacuate(self, message: str) -> Outgoing:
        """Drop every request (this stage stops serving its range): each gateway is told
        ``preempted`` and resubmits the request, with its tokens so far, to another chain."""
        out: Outgoing = []
        replies: dict[str, str | None] = {rid: s.reply for rid, s in self.seqs.items()}
        for rid, works in self.waiting.items():
            replies[rid] = self._reply_for(works[0].item)
        while self._inbox:
            header, _ = self._inbox.popleft()
            for item in header.items if isinstance(header, Forward) else ():
                replies.setdefault(item.rid, self._reply_for(item))
        for rid, reply in replies.items():
            if rid not in self._released:
                self._fail(rid, reply, message, out, "preempted")
        return out

    def _finish(self, seq: Sequence, token: int) -> Finish | None:
        """The one place that ends a request (the gateway trusts it). The sampler bans stop tokens
        before ``min_tokens``, so a stop token here may end the output."""
        p = seq.meta.sampling
        if token in p.stop_token_ids and not p.ignore_eos:
            return "stop"
        if seq.constraint is not None and seq.constraint.complete:  # the grammar allows nothing but a stop now
            return "stop"
        if len(seq.generated) >= p.max_tokens or seq.length + 1 >= self.spec.max_positions:
            return "length"
        return None

    # --- errors, release, expiry -------------------------------------------------------------------
    def _reply_for(self, item: ForwardItem) -> str | None:
        seq = self.seqs.get(item.rid)
        if seq is not None:
            return seq.reply
        waiting = self.waiting.get(item.rid)
        meta = item.meta or (waiting[0].item.meta if waiting else None)
        return meta.reply if meta else None

    def _fail(self, rid: str, reply: str | None, message: str, out: Outgoing, code: ErrorCode = "bad_request") -> None:
        log.warning("request %s: %s", rid, message)
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
        if reply:
            out.append((reply, encode(ErrorMsg(rid=rid, message=message, node=self.node_id, code=code))))
        self._release([rid], out, broadcast=True)

    def _release(self, rids, out: Outgoing, broadcast: bool) -> None:
        for rid in rids:
            seq = self.seqs.pop(rid, None)
            if seq is not None:
                self.blocks.release(seq.kv)
            self.waiting.pop(rid, None)
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


def _output(seq: Sequence) -> tuple[int, ...]:
    """The request's output so far: the tokens generated before this try (a resumed request's prompt
    ends with them, ``token_offset`` of them) and this try's."""
    resumed = seq.meta.sampling.first_index
    prompt = seq.meta.prompt_ids
    return prompt[len(prompt) - resumed :] + tuple(seq.generated) if resumed else tuple(seq.generated)


def _ids(token: int) -> memoryview:
    """One token id as the int32 row the first stage takes."""
    return memoryview(token.to_bytes(4, "little", signed=True))
