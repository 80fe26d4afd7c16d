"""Soak: minutes of mixed load on a local cluster, one stage restarted every few minutes.

    python -m bench.soak --minutes 20

The cluster is what ``parallax up --stages 2`` runs, plus a replica of the last range: an embedded
nats-server, stage ``a`` (the first half of the layers), ``b0`` and ``b1`` (both the second half)
and a gateway, all children of this process, stopped by PID. float32, so that greedy text is exact
also across a resume. Before the load, the reference text of every prompt is computed once, one
request at a time. Then ``--concurrency`` clients send requests one after another, of these kinds:
short prompts streamed (``stream``) or not (``plain``), long prompts (``long``, either way), streams
aborted with ``POST /v1/requests/{id}/abort`` after a few chunks (``abort``) and streams the client
drops after a few chunks (``disconnect``); after an error a client waits a second. Every
``--restart-every`` seconds one stage, in turn (``b0``, ``a``, ``b1``), gets SIGTERM: it drains (a
``b`` hands its requests to the other replica, ``a`` finishes them), exits, and is started again
under a new node id.

Every request must complete with its reference text (a cut-off one: a prefix of it) or end with a
clear error (an OpenAI error JSON or SSE error event with a message: ``draining``, no chain while
``a`` restarts). The RSS of the gateway and of every stage process is sampled every
``--sample-every`` seconds; its drift is the change from the first to the last samples taken after
the process's first ``--warmup`` seconds of serving (target: within 10%). After the load every stage must hold
no request and no KV block. Prints a summary; exit code 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil

from bench.natsstats import StatsClient, stats_client
from bench.prompts import token_prompt, tokenizer_encoder
from parallax.broker.server import EmbeddedServer, ServerConfig, free_port
from parallax.procs import Child, ProcessGroup

KINDS: dict[str, float] = {"stream": 0.30, "plain": 0.25, "long": 0.15, "abort": 0.15, "disconnect": 0.15}  # share of requests
RESTART_ORDER = ("b0", "a", "b1")  # a replica's hand-over, the only first range's drain, the other replica
RESTART_EVERY_S = 240.0  # at most; a run shorter than 12 minutes restarts every third of it
RSS_TARGET = 0.10
DRIFT_SAMPLES = 3  # samples averaged (median) at each end of the drift
READY_TIMEOUT_S = 300.0
STATUSES = ("ok", "aborted", "disconnected", "error", "wrong", "unclear", "hung")
FAILED = frozenset({"wrong", "unclear", "hung"})
ERROR_BACKOFF_S = 1.0  # a client waits this long after an error (no chain while `a` restarts) before its next request


class SoakError(RuntimeError):
    """The soak could not run (the cluster did not come up, a process died, no reference)."""


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 20.0
    model: str = "smollm2-135m"
    concurrency: int = 4
    restart_every_s: float | None = None  # None: a third of the run, at most RESTART_EVERY_S
    warmup_s: float = 60.0
    sample_every_s: float = 10.0
    drain_timeout_s: float = 30.0
    request_timeout_s: float = 300.0
    short_prompts: int = 6
    long_prompts: int = 2
    short_len: int = 24
    long_len: int = 400
    short_tokens: int = 32
    long_tokens: int = 16
    seed: int = 0
    stage_args: tuple[str, ...] = ()
    log_dir: Path | None = None  # None: a new temporary folder

    def __post_init__(self) -> None:
        if self.minutes < 0:
            raise ValueError(f"--minutes must not be negative, got {self.minutes}")
        if self.restart_every_s is not None and self.restart_every_s <= 0:
            raise ValueError(f"--restart-every must be positive, got {self.restart_every_s}")
        for name in ("concurrency", "short_prompts", "long_prompts", "short_len", "long_len", "short_tokens", "long_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_s", "sample_every_s", "drain_timeout_s", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name[:-2].replace('_', '-')} must be positive, got {getattr(self, name)}")

    @property
    def run_s(self) -> float:
        return self.minutes * 60

    @property
    def restart_period_s(self) -> float:
        return self.restart_every_s or min(RESTART_EVERY_S, self.run_s / 3) or RESTART_EVERY_S


def build_parser() -> argparse.ArgumentParser:
    d = SoakConfig()
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=d.minutes, help="length of the load (0: cluster and references only)")
    p.add_argument("--model", default=d.model, help="model of every stage (served in float32)")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="clients sending requests at once")
    p.add_argument("--restart-every", type=float, default=None, metavar="S",
                   help=f"seconds between stage restarts (default: a third of the run, at most {RESTART_EVERY_S:g})")
    p.add_argument("--warmup", type=float, default=d.warmup_s, metavar="S", help="RSS drift ignores a process's first S seconds")
    p.add_argument("--sample-every", type=float, default=d.sample_every_s, metavar="S", help="RSS sampling period")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s, metavar="S", help="every stage's --drain-timeout")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout_s, metavar="S",
                   help="a request still running after S seconds counts as hung")
    for name in ("short_prompts", "long_prompts", "short_len", "long_len", "short_tokens", "long_tokens"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--seed", type=int, default=d.seed, help="prompts and the request mix")
    p.add_argument("--stage-args", default="", help='extra flags for every parallax-stage, e.g. "--threads 1"')
    p.add_argument("--log-dir", type=Path, default=None, help="process logs (default: a new temporary folder)")
    return p


def config_from_args(args: argparse.Namespace) -> SoakConfig:
    return SoakConfig(
        minutes=args.minutes, model=args.model, concurrency=args.concurrency, restart_every_s=args.restart_every,
        warmup_s=args.warmup, sample_every_s=args.sample_every, drain_timeout_s=args.drain_timeout,
        request_timeout_s=args.request_timeout, short_prompts=args.short_prompts, long_prompts=args.long_prompts,
        short_len=args.short_len, long_len=args.long_len, short_tokens=args.short_tokens, long_tokens=args.long_tokens,
        seed=args.seed, stage_args=tuple(args.stage_args.split()), log_dir=args.log_dir)


# ------------------------------------------------------------------------------------ pure parts
@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True)
class Outcome:
    kind: str
    status: str  # one of STATUSES
    detail: str = ""  # the error's message, or what was wrong


def judge(kind: str, text: str, reference: str, error: dict | None, complete: bool) -> Outcome:
    """One request's outcome from what the client saw: ``text`` so far, an error (the OpenAI error
    object, or {} for an error without one) and whether the response ended normally."""
    if error is not None:
        message = str(error.get("message") or "")
        if not reference.startswith(text):
            return Outcome(kind, "wrong", f"text before the error is not the reference's start: {text[:60]!r}")
        if not message:
            return Outcome(kind, "unclear", orjson.dumps(error).decode()[:200])
        aborted = kind == "abort" and error.get("code") == "request_aborted"
        return Outcome(kind, "aborted" if aborted else "error", message)
    if not complete:
        if kind == "disconnect" and reference.startswith(text):
            return Outcome(kind, "disconnected")
        return Outcome(kind, "wrong", f"the response ended early: {text[:60]!r}")
    if text != reference:
        return Outcome(kind, "wrong", f"got {text[:60]!r}, expected {reference[:60]!r}")
    return Outcome(kind, "ok")


def rss_drift(samples: list[tuple[float, int]], warmup_s: float) -> float | None:
    """(age s, RSS bytes) samples of one process -> relative change from the first to the last
    DRIFT_SAMPLES samples after ``warmup_s``; None with too few samples for two separate ends."""
    rss = [value for age, value in samples if age >= warmup_s]
    if len(rss) < 2 * DRIFT_SAMPLES:
        return None
    first, last = statistics.median(rss[:DRIFT_SAMPLES]), statistics.median(rss[-DRIFT_SAMPLES:])
    return (last - first) / first


def error_key(message: str) -> str:
    """An error message with node ids, request ids and numbers blanked: messages of one kind group."""
    message = re.sub(r"\b[0-9a-f]{6,}\b|cmpl-\w+", "#", message)
    return re.sub(r"\b\d+(\.\d+)?\b", "N", message)[:110]


def resumed_tries(gateway_log: str) -> int:
    """How many times the gateway resumed a request with tokens so far (not a fresh resubmission)."""
    return sum(int(n) > 0 for n in re.findall(r"(?:resubmitting|resuming on live replicas) with (\d+) tokens so far", gateway_log))


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# --------------------------------------------------------------------------------------- cluster
@dataclass
class Restart:
    slot: str
    old: str
    new: str
    exit_code: int | None
    drain_s: float
    serving_after_s: float | None = None


@dataclass
class Cluster:
    """nats-server, stages by slot (a, b0, b1) and a gateway; every child stopped by PID."""

    cfg: SoakConfig
    log_dir: Path
    ranges: dict[str, str]  # slot -> "start:end"
    group: ProcessGroup = field(default_factory=ProcessGroup)
    server: EmbeddedServer | None = None
    url: str = ""
    current: dict[str, tuple[str, Child]] = field(default_factory=dict)  # slot (or "gateway") -> (label, child)
    ready: dict[str, float] = field(default_factory=dict)  # label -> when it served (monotonic): its age counts from there
    turns: Counter = field(default_factory=Counter)

    def start(self) -> None:
        self.server = EmbeddedServer(ServerConfig(port=free_port())).start()
        for slot in self.ranges:
            self.spawn_stage(slot)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._spawn("gateway", "gateway", [sys.executable, "-m", "parallax.gateway.cli", "--model", self.cfg.model,
                                           "--nats", self.server.url, "--port", str(port)])

    def spawn_stage(self, slot: str) -> str:
        self.turns[slot] += 1
        node_id = slot if self.turns[slot] == 1 else f"{slot}.{self.turns[slot]}"
        self._spawn(slot, node_id, [sys.executable, "-m", "parallax.stages.cli", "--model", self.cfg.model,
                                    "--layers", self.ranges[slot], "--nats", self.server.url, "--dtype", "float32",
                                    "--node-id", node_id, "--drain-timeout", str(self.cfg.drain_timeout_s),
                                    *self.cfg.stage_args])
        return node_id

    def _spawn(self, slot: str, label: str, cmd: list[str]) -> None:
        log = open(self.log_dir / f"{label}.log", "wb")
        self.current[slot] = (label, self.group.spawn(label, cmd, stdout=log, stderr=log))

    def check(self) -> None:
        """Raise when a current process (not one being restarted) has exited."""
        for label, child in self.current.values():
            if child.returncode is not None:
                raise SoakError(f"{label} exited with {child.returncode}; see {self.log_dir / (label + '.log')}")

    async def wait_ready(self, stats: StatsClient, node_ids: set[str]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as http:
            while time.monotonic() < deadline:
                self.check()
                answered = {r.get("node_id") for r in await stats.collect()}
                with_health = await _healthy(http)
                if node_ids <= answered and with_health:
                    now = time.monotonic()
                    self.ready.update({label: now for label, _ in self.current.values() if label not in self.ready})
                    return
                await asyncio.sleep(0.5)
        raise SoakError(f"the cluster was not ready within {READY_TIMEOUT_S:g} s (logs in {self.log_dir})")

    async def restart(self, slot: str, stats: StatsClient) -> Restart:
        """SIGTERM the stage of ``slot`` (it drains), wait for its exit, start it again, wait until it answers."""
        old, child = self.current.pop(slot)
        began = time.monotonic()
        child.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(_wait, child, self.cfg.drain_timeout_s + 60)
        record = Restart(slot, old, "", code, time.monotonic() - began)
        record.new = self.spawn_stage(slot)
        await self.wait_ready(stats, {record.new})
        record.serving_after_s = time.monotonic() - began
        return record

    def processes(self) -> dict[str, int]:
        return {label: child.pid for label, child in self.current.values() if child.returncode is None}

    def stop(self) -> None:
        self.group.stop_all(grace=self.cfg.drain_timeout_s + 10)
        if self.server is not None:
            self.server.stop()


def _wait(child: Child, timeout: float) -> int | None:
    try:
        return child.proc.wait(timeout)
    except Exception:  # noqa: BLE001 -- still running: stop_all kills it at the end
        return None


async def _healthy(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/health")).status_code == 200
    except httpx.HTTPError:
        return False


# ------------------------------------------------------------------------------------------ load
def body(prompt: Prompt, stream: bool) -> dict[str, Any]:
    return {"prompt": list(prompt.ids), "max_tokens": prompt.max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": stream}


async def plain(http: httpx.AsyncClient, kind: str, prompt: Prompt, reference: str) -> Outcome:
    response = await http.post("/v1/completions", json=body(prompt, False))
    if response.status_code != 200:
        return judge(kind, "", reference, _error_of(response.content), True)
    return judge(kind, response.json()["choices"][0]["text"], reference, None, True)


async def streamed(http: httpx.AsyncClient, kind: str, prompt: Prompt, reference: str, cut_after: int | None) -> Outcome:
    """A streamed request; ``cut_after`` text chunks into it, ``abort`` posts an abort and
    ``disconnect`` closes the connection."""
    text, error, complete = "", None, False
    async with http.stream("POST", "/v1/completions", json=body(prompt, True)) as response:
        if response.status_code != 200:
            return judge(kind, "", reference, _error_of(await response.aread()), True)
        chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                complete = True
                break
            event = orjson.loads(line[6:])
            if "error" in event:
                error = event["error"] if isinstance(event["error"], dict) else {}
                continue
            if event["choices"] and (piece := event["choices"][0].get("text")):
                text += piece
                chunks += 1
                if chunks == cut_after and kind == "disconnect":
                    break
                if chunks == cut_after and kind == "abort":
                    await http.post(f"/v1/requests/{event['id']}/abort")  # 404 when it has just finished
    return judge(kind, text, reference, error, complete and error is None)


def _error_of(content: bytes) -> dict:
    try:
        error = orjson.loads(content).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


async def one(http: httpx.AsyncClient, kind: str, prompt: Prompt, reference: str, rng: random.Random,
              timeout_s: float) -> Outcome:
    try:
        async with asyncio.timeout(timeout_s):
            if kind == "plain" or (kind == "long" and rng.random() < 0.5):
                return await plain(http, kind, prompt, reference)
            return await streamed(http, kind, prompt, reference, rng.randint(1, 4))
    except TimeoutError:
        return Outcome(kind, "hung", f"no end within {timeout_s:g} s")
    except (httpx.HTTPError, orjson.JSONDecodeError, KeyError, IndexError) as e:
        return Outcome(kind, "unclear", f"{type(e).__name__}: {e}"[:200])


async def client(http: httpx.AsyncClient, prompts: dict[str, list[Prompt]], references: dict[Prompt, str],
                 rng: random.Random, until: float, timeout_s: float, outcomes: list[Outcome]) -> None:
    kinds, weights = list(KINDS), list(KINDS.values())
    while time.monotonic() < until:
        kind = rng.choices(kinds, weights)[0]
        prompt = rng.choice(prompts["long" if kind == "long" else "short"])
        outcomes.append(await one(http, kind, prompt, references[prompt], rng, timeout_s))
        if outcomes[-1].status == "error":
            await asyncio.sleep(ERROR_BACKOFF_S)


# ------------------------------------------------------------------------------------------ soak
@dataclass
class Results:
    outcomes: list[Outcome] = field(default_factory=list)
    restarts: list[Restart] = field(default_factory=list)
    rss: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # label -> (age s, RSS bytes)
    pids: dict[str, int] = field(default_factory=dict)
    leftover: list[dict] = field(default_factory=list)  # stages' stats after the load
    load_s: float = 0.0
    resumed: int = 0  # tries the gateway resubmitted with tokens so far (its log)


async def sample_rss(cluster: Cluster, results: Results, every_s: float) -> None:
    while True:
        cluster.check()
        now = time.monotonic()
        for label, pid in cluster.processes().items():
            try:
                rss = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
            results.pids[label] = pid
            age = now - cluster.ready.get(label, now + 1)  # negative while a restarted stage loads
            results.rss.setdefault(label, []).append((age, rss))
        await asyncio.sleep(every_s)


async def restarter(cluster: Cluster, stats: StatsClient, period_s: float, until: float, results: Results) -> None:
    at = time.monotonic()
    for slot in itertools.cycle(RESTART_ORDER):
        at += period_s
        if at > until - 10:  # none in the last seconds: its drain would outlast the load
            return
        await asyncio.sleep(at - time.monotonic())
        say(f"restarting {cluster.current[slot][0]} ({slot}, layers {cluster.ranges[slot]})")
        results.restarts.append(await cluster.restart(slot, stats))
        say(f"  {results.restarts[-1].new} serving {results.restarts[-1].serving_after_s:.1f} s after the SIGTERM")


def build_prompts(cfg: SoakConfig, encode) -> dict[str, list[Prompt]]:
    rng = random.Random(cfg.seed)
    return {"short": [Prompt(tuple(token_prompt(rng, encode, cfg.short_len)), cfg.short_tokens) for _ in range(cfg.short_prompts)],
            "long": [Prompt(tuple(token_prompt(rng, encode, cfg.long_len)), cfg.long_tokens) for _ in range(cfg.long_prompts)]}


async def references(http: httpx.AsyncClient, prompts: dict[str, list[Prompt]]) -> dict[Prompt, str]:
    """Each prompt's greedy text, once, alone on the undisturbed cluster."""
    found: dict[Prompt, str] = {}
    for prompt in itertools.chain(*prompts.values()):
        response = await http.post("/v1/completions", json=body(prompt, False))
        if response.status_code != 200:
            raise SoakError(f"the reference of a prompt failed: HTTP {response.status_code}: {response.text[:300]}")
        found[prompt] = response.json()["choices"][0]["text"]
    return found


async def soak(cfg: SoakConfig, cluster: Cluster, prompts: dict[str, list[Prompt]], results: Results) -> None:
    async with stats_client(cluster.server.url, None) as stats:
        say(f"waiting for the cluster (logs in {cluster.log_dir})")
        await cluster.wait_ready(stats, set(cluster.ranges))
        limits = httpx.Limits(max_connections=cfg.concurrency * 2 + 4)
        async with httpx.AsyncClient(base_url=cluster.url, timeout=cfg.request_timeout_s, limits=limits) as http:
            say(f"computing the reference text of {sum(map(len, prompts.values()))} prompts")
            refs = await references(http, prompts)
            sampler = asyncio.create_task(sample_rss(cluster, results, cfg.sample_every_s))
            began = time.monotonic()
            until = began + cfg.run_s
            say(f"load: {cfg.concurrency} clients for {cfg.minutes:g} min, a stage restarted every {cfg.restart_period_s:g} s")
            rng = random.Random(cfg.seed + 1)
            clients = [asyncio.create_task(client(http, prompts, refs, random.Random(rng.random()), until,
                                                  cfg.request_timeout_s, results.outcomes))
                       for _ in range(cfg.concurrency if cfg.run_s else 0)]
            restarts = asyncio.create_task(restarter(cluster, stats, cfg.restart_period_s, until, results))
            try:
                await _progress(clients, sampler, results, began)
                await restarts  # a restart under way finishes (its drain needs no more load)
            finally:
                for task in (restarts, sampler, *clients):
                    task.cancel()
                await asyncio.gather(restarts, sampler, *clients, return_exceptions=True)
            results.load_s = time.monotonic() - began
        results.leftover = await _settled(stats, len(cluster.ranges))
        results.resumed = resumed_tries((cluster.log_dir / "gateway.log").read_text(errors="replace"))


async def _progress(clients: list[asyncio.Task], sampler: asyncio.Task, results: Results, began: float) -> None:
    """Until every client is done; a line a minute; a dead process (the sampler fails) ends it."""
    pending = set(clients)
    while pending:
        done, pending = await asyncio.wait(pending | {sampler}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if sampler in done:
            sampler.result()  # raises SoakError
        pending.discard(sampler)
        for task in done - {sampler}:
            task.result()
        if done and pending:
            continue  # a client ended: no line
        counts = Counter(o.status for o in results.outcomes)
        say(f"{time.monotonic() - began:5.0f} s: " + ", ".join(f"{s} {counts[s]}" for s in STATUSES if counts[s]))


async def _settled(stats: StatsClient, stages: int) -> list[dict]:
    """The stages' counters once none holds a request or KV block (or after 15 s)."""
    deadline = time.monotonic() + 15
    while True:
        replies = await stats.collect()
        idle = all(r["running"] == 0 and r["waiting"] == 0 and r["kv"]["blocks_used"] == 0 for r in replies)
        if (idle and len(replies) >= stages) or time.monotonic() > deadline:
            return replies
        await asyncio.sleep(0.5)


# --------------------------------------------------------------------------------------- summary
def summary(cfg: SoakConfig, results: Results) -> tuple[str, bool]:
    """The report, and whether every target was met."""
    outcomes, parts = results.outcomes, []
    by_kind = Counter((o.kind, o.status) for o in outcomes)
    rows = [[kind, *(by_kind[kind, s] for s in STATUSES), sum(by_kind[kind, s] for s in STATUSES)] for kind in KINDS]
    rows.append(["all", *(sum(by_kind[k, s] for k in KINDS) for s in STATUSES), len(outcomes)])
    parts.append(f"## Requests ({results.load_s / 60:.1f} min of load, {cfg.concurrency} clients; the gateway resumed "
                 f"{results.resumed} tries with tokens so far)\n" + table(["kind", *STATUSES, "total"], rows))
    messages = Counter((o.status, error_key(o.detail)) for o in outcomes if o.detail)
    if messages:
        parts.append("## Errors and failures\n" + table(["status", "count", "message"],
                                                         [[s, n, m] for (s, m), n in messages.most_common(12)]))
    parts.append("## Restarts (SIGTERM, drain, exit, start again)\n" + table(
        ["stage", "new id", "exit code", "drained in s", "serving again after s"],
        [[r.old, r.new, r.exit_code, f"{r.drain_s:.1f}", "-" if r.serving_after_s is None else f"{r.serving_after_s:.1f}"]
         for r in results.restarts]))
    drifts = {label: rss_drift(samples, cfg.warmup_s) for label, samples in results.rss.items()}
    parts.append(f"## RSS (every {cfg.sample_every_s:g} s; drift after each process's first {cfg.warmup_s:g} s)\n" + table(
        ["process", "pid", "samples", "min MiB", "max MiB", "last MiB", "drift"],
        [[label, results.pids.get(label, "-"), len(s), _mib(min(v for _, v in s)), _mib(max(v for _, v in s)), _mib(s[-1][1]),
          "n/a (too short)" if drifts[label] is None else f"{drifts[label]:+.1%}"] for label, s in results.rss.items()]))
    parts.append("## Stages after the load\n" + table(
        ["stage", "running", "waiting", "KV blocks used", "cached", "steps", "preempted"],
        [[r["node_id"], r["running"], r["waiting"], r["kv"]["blocks_used"], r["kv"]["blocks_cached"], r["steps"], r["preempted"]]
         for r in results.leftover]))
    failed = sum(1 for o in outcomes if o.status in FAILED)
    measured = [d for d in drifts.values() if d is not None]
    leaked = [r["node_id"] for r in results.leftover if r["running"] or r["waiting"] or r["kv"]["blocks_used"]]
    checks = [
        (f"every request right or a clear error: {failed} of {len(outcomes)} failed", failed == 0),
        (f"RSS flat within {RSS_TARGET:.0%} after warm-up: largest drift "
         + (f"{max(measured, key=abs):+.1%} over {len(measured)} processes" if measured else "n/a"),
         all(abs(d) <= RSS_TARGET for d in measured)),
        (f"stages idle after the load: {', '.join(leaked) or 'all'}" + (" still hold work" if leaked else ""), not leaked),
        (f"every restarted stage exited 0: {[r.exit_code for r in results.restarts]}",
         all(r.exit_code == 0 for r in results.restarts)),
    ]
    parts.append("## Targets\n" + "\n".join(f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks))
    return "\n\n".join(parts), all(ok for _, ok in checks)


def _mib(value: int) -> str:
    return f"{value / (1 << 20):.0f}"


def say(line: str) -> None:
    print(f"soak: {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(build_parser().parse_args(argv))
    except ValueError as e:
        print(f"python -m bench.soak: error: {e}", file=sys.stderr)
        return 2
    from parallax.broker.layers import even_split
    from parallax.broker.model import ModelFacts, resolve_model

    source = resolve_model(cfg.model)
    first, last = even_split(ModelFacts.read(source.path).num_layers, 2)
    log_dir = cfg.log_dir or Path(tempfile.mkdtemp(prefix="parallax-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    ranges = {"a": f"{first[0]}:{first[1]}", "b0": f"{last[0]}:{last[1]}", "b1": f"{last[0]}:{last[1]}"}
    cluster = Cluster(cfg, log_dir, ranges)
    prompts = build_prompts(cfg, tokenizer_encoder(str(source.path)))
    results = Results()
    try:
        cluster.start()
        asyncio.run(soak(cfg, cluster, prompts, results))
    except SoakError as e:
        say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        say("stopping the cluster")
        cluster.stop()
    report, ok = summary(cfg, results)
    print(report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
