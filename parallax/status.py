"""``parallax status``: what the cluster registry (JetStream KV bucket ``parallax-nodes``) says now.

    parallax status [--nats URL] [--model M] [--json]

One row per node key (``stage.<id>``, ``gateway.<id>``, ``scheduler.<id>``), then per model the layer
coverage by serving stages (replicas per boundary segment, missing ranges, how many complete
pipelines can run side by side), then the leading scheduler. A stage's MEMORY is ``weights/offered``:
the bytes its range holds by its profile (every layer at its own size) and what it may fill. The pure part (:func:`build_status`,
:func:`render_table`) works on a ``{key: bytes}`` snapshot; :func:`fetch_snapshot` is the NATS part.
Exit codes: 0, 2 when NATS is unreachable or has no JetStream (or for bad input), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from itertools import pairwise
from typing import Any

from pydantic import ValidationError

from parallax.broker.cli import nats_options
from parallax.broker.connection import NatsOptions
from parallax.broker.errors import RegistryError, UsageError
from parallax.broker.registry import ASSIGN_PREFIX, LEADER_KEY, Assignment, NodeInfo
from parallax.scheduler.graph import disjoint_chains, find_chain, missing_ranges

STALE_S = 5.0  # a node whose last heartbeat (its own wall clock) is older than this shows as stale
KIND_ORDER = ("stage", "gateway", "scheduler")
NODE_PREFIXES = tuple(f"{k}." for k in KIND_ORDER)
NO_SCHEDULER = "no scheduler (assignments stay as they are)"
COLUMNS = ("KIND", "NODE", "MODEL", "LAYERS", "STATE", "DEVICE", "DTYPE", "MEMORY", "LOAD", "LAYER_MS", "HEALTH",
           "VERSION", "ASSIGNMENT")


# --- pure part: snapshot -> status dict -> text ---------------------------------------------------
def build_status(snapshot: Mapping[str, bytes], model: str | None = None, now: float | None = None,
                 stale_s: float = STALE_S) -> dict[str, Any]:
    """The status of a ``{key: value}`` snapshot of the bucket (``now``: wall clock, for health).

    Returns ``{"nodes": [...], "models": {...}, "leader": str | None, "invalid": [keys]}``: every node
    as its NodeInfo dict plus ``"assignment"`` (the Assignment dict under ``assign.<id>``, or None)
    , ``"health"`` (``"ok"``/``"stale"``) and ``"weight_bytes"`` (what its range holds by its profile, or
    None); per model ``num_layers``, ``coverage`` (boundary
    segments with their count of serving stages), ``missing`` ranges, ``complete`` (a chain 0..L
    exists) and ``pipelines`` (how many complete chains can run at once, no stage shared).
    ``model`` keeps only that model's nodes and coverage (schedulers, which have no model, stay).
    """
    now = time.time() if now is None else now
    nodes: list[NodeInfo] = []
    assignments: dict[str, Assignment] = {}
    invalid: list[str] = []
    leader: str | None = None
    for key in sorted(snapshot):
        value = snapshot[key]
        try:
            if key.startswith(NODE_PREFIXES):
                info = NodeInfo.model_validate_json(value)
                if info.key != key:
                    raise ValueError(f"{key} holds {info.key}")
                nodes.append(info)
            elif key.startswith(ASSIGN_PREFIX):
                assignment = Assignment.model_validate_json(value)
                assignments[key[len(ASSIGN_PREFIX):]] = assignment
            elif key == LEADER_KEY:
                leader = value.decode() or None
        except (ValidationError, ValueError, UnicodeDecodeError):
            invalid.append(key)
    if model is not None:
        nodes = [n for n in nodes if n.model == model or n.kind == "scheduler"]
    nodes.sort(key=_node_order)

    node_dicts = []
    for n in nodes:
        d = n.model_dump(mode="json")
        assignment = assignments.get(n.node_id) if n.kind == "stage" else None
        d["assignment"] = assignment.model_dump(mode="json") if assignment is not None else None
        d["health"] = health(n, now, stale_s)
        d["age_s"] = round(max(0.0, now - n.updated), 1)  # since its last heartbeat, by its own clock
        d["weight_bytes"] = weight_bytes(n)
        node_dicts.append(d)

    names = sorted({n.model for n in nodes if n.model})
    if model is not None and model not in names:
        names.append(model)
    models = {name: model_coverage([n for n in nodes if n.model == name]) for name in names}
    return {"nodes": node_dicts, "models": models, "leader": leader, "invalid": invalid}


def _node_order(n: NodeInfo) -> tuple:
    start = n.start if n.start is not None else 1 << 62
    return (KIND_ORDER.index(n.kind), n.model, start, n.end or 0, n.node_id)


def weight_bytes(node: NodeInfo) -> int | None:
    """Weights a stage holds for its range by its profile (each layer as large as it is), or None."""
    if node.profile is None or node.layers is None or node.end > node.profile.num_layers:
        return None
    return node.profile.range_bytes(*node.layers)


def memory_text(d: Mapping[str, Any]) -> str:
    """``weights/offered`` where the stage's weights are known, else what it offers."""
    offered = human_bytes(d.get("memory_offered", 0))
    held = d.get("weight_bytes")
    return offered if not held else f"{human_bytes(held)}/{offered}"


def health(node: NodeInfo, now: float, stale_s: float = STALE_S) -> str:
    """``"stale"`` when the node's last heartbeat (``updated``, its own clock) is over ``stale_s`` old."""
    return "stale" if now - node.updated > stale_s else "ok"


def num_layers_of(nodes: Iterable[NodeInfo]) -> int:
    """The model's layer count as its nodes report it (0 when none does)."""
    counts = [n.num_layers or (n.profile.num_layers if n.profile is not None else 0) for n in nodes]
    return max(counts, default=0)


def model_coverage(nodes: list[NodeInfo]) -> dict[str, Any]:
    """Coverage of one model's layers by its serving stages (``nodes``: that model's nodes, any kind)."""
    num_layers = num_layers_of(nodes)
    ranges = [n.layers for n in nodes if n.serves]
    if num_layers == 0:  # nobody said: the layers served are all we know
        num_layers = max((b for _, b in ranges), default=0)
    ranges = [(a, b) for a, b in ranges if 0 <= a < b <= num_layers]
    if num_layers == 0:
        return {"num_layers": 0, "coverage": [], "missing": [], "complete": False, "pipelines": 0}
    return {
        "num_layers": num_layers,
        "coverage": coverage(ranges, num_layers),
        "missing": [[a, b] for a, b in missing_ranges(ranges, num_layers)],
        "complete": find_chain(ranges, num_layers) is not None,
        "pipelines": disjoint_chains(ranges, num_layers),
    }


def coverage(ranges: list[tuple[int, int]], num_layers: int) -> list[dict[str, int]]:
    """Layers 0..num_layers cut at every range boundary; per segment, how many ranges contain it."""
    cuts = sorted({0, num_layers, *(x for r in ranges for x in r if 0 < x < num_layers)})
    return [{"start": a, "end": b, "replicas": sum(1 for s, e in ranges if s <= a and b <= e)}
            for a, b in pairwise(cuts)]


def human_bytes(n: int) -> str:
    if n <= 0:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _layers(d: Mapping[str, Any]) -> str:
    return "-" if d.get("start") is None else f"{d['start']}:{d['end']}"


def _load(d: Mapping[str, Any]) -> str:
    load = d.get("load") or {}
    text = f"{load.get('running', 0)}/{load.get('waiting', 0)}"
    total = load.get("kv_blocks_total", 0)
    if total > 0:
        text += f" kv {100 * load.get('kv_blocks_used', 0) / total:.0f}%"
    return text


def assignment_text(d: Mapping[str, Any]) -> str:
    """``-> a:b (state)`` when the scheduler assigned a stage something else than what it serves."""
    a = d.get("assignment")
    if not a:
        return ""
    serving = d.get("state") == "serving" and d.get("start") is not None
    if serving and (a["model"], a["start"], a["end"]) == (d.get("model"), d.get("start"), d.get("end")):
        return ""
    target = f"{a['start']}:{a['end']}" if a["model"] == d.get("model") else f"{a['model']} {a['start']}:{a['end']}"
    return f"-> {target} ({d.get('state') if not serving else 'pending'})"


def node_row(d: Mapping[str, Any]) -> list[str]:
    stage = d["kind"] == "stage"  # device, dtype, memory and speed describe stages only
    layer_ms = d.get("layer_ms")
    return [
        d["kind"], d["node_id"], d.get("model") or "-", _layers(d), state_text(d),
        _device(d) if stage else "-", (d.get("dtype") or "-") if stage else "-",
        memory_text(d), _load(d) if d["kind"] != "scheduler" else "-",
        "-" if layer_ms is None else f"{layer_ms:.2f}", d.get("health", ""), d.get("version") or "-",
        assignment_text(d),
    ]


def state_text(d: Mapping[str, Any]) -> str:
    """The state, with the download's progress while loading (``loading 37%``)."""
    state, progress = d.get("state", ""), d.get("progress")
    return f"{state} {100 * progress:.0f}%" if state == "loading" and progress is not None else state


def _device(d: Mapping[str, Any]) -> str:
    """The stage's device, prefixed by its backend unless that is torch (``mlx:gpu``, ``cuda:0``)."""
    device, backend = d.get("device") or "-", d.get("backend") or "torch"
    return device if backend == "torch" else f"{backend}:{device}"


def table(rows: list[list[str]], header: Iterable[str] = COLUMNS) -> list[str]:
    rows = [list(header), *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def coverage_line(name: str, m: Mapping[str, Any]) -> str:
    if m["num_layers"] == 0:
        return f"{name}: no serving stages, layer count unknown"
    segments = ", ".join(f"{c['start']}:{c['end']} x{c['replicas']}" for c in m["coverage"])
    line = f"{name}: {m['num_layers']} layers; {segments}; complete pipelines: {m['pipelines']}"
    if m["missing"]:
        line += "; MISSING " + ", ".join(f"{a}:{b}" for a, b in m["missing"])
    return line


def render_table(status: Mapping[str, Any]) -> str:
    """The human view: the node table, one coverage line per model, the leader."""
    lines: list[str] = []
    if status["nodes"]:
        lines += table([node_row(d) for d in status["nodes"]])
    else:
        lines.append("no nodes registered")
    if status["models"]:
        lines.append("")
        lines += [coverage_line(name, m) for name, m in status["models"].items()]
    lines += kernel_lines(status["nodes"])
    lines += ghost_lines(status["nodes"])
    lines.append("")
    lines.append(f"leader scheduler: {status['leader']}" if status["leader"] else NO_SCHEDULER)
    if status.get("invalid"):
        lines.append("ignored unreadable entries: " + ", ".join(status["invalid"]))
    return "\n".join(lines)


def kernel_lines(nodes: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per stage that reports its kernels: what each projection runs on (measured at load)."""
    lines = [f"kernels {d['node_id']}: " + ", ".join(f"{op} {name}" for op, name in sorted(d["kernels"].items()))
             for d in nodes if d.get("kernels")]
    return [""] + lines if lines else []


def ghost_lines(nodes: Iterable[Mapping[str, Any]]) -> list[str]:
    """The records whose heartbeat stopped (health ``stale``: a key that should have expired), and how
    to remove them."""
    ghosts = [f"{d['node_id']} ({d['kind']}, {d.get('age_s', 0):.0f} s)" for d in nodes if d.get("health") == "stale"]
    if not ghosts:
        return []
    return ["", f"GHOSTS: no heartbeat for over {STALE_S:g} s: {', '.join(ghosts)}; "
                "`parallax evict NODE` removes one"]


def render_json(status: Mapping[str, Any]) -> str:
    import orjson

    return orjson.dumps(status, option=orjson.OPT_SORT_KEYS).decode()


# --- NATS part -----------------------------------------------------------------------------------
async def fetch_snapshot(options: NatsOptions, timeout_s: float = 5.0) -> dict[str, bytes]:
    """Every live key of ``parallax-nodes`` and its value. Raises ``NatsUnreachable``, ``NoJetStream``
    or :class:`RegistryError`."""
    import nats.errors

    from parallax.broker.connection import connect
    from parallax.broker.kv import nodes_bucket, snapshot

    url = options.url
    nc = await connect(options, name="parallax-status", first_connect_s=timeout_s)
    try:
        kv = await nodes_bucket(nc, options.js_domain, timeout_s=timeout_s)  # NoJetStream passes through
        return await asyncio.wait_for(snapshot(kv), timeout_s * 2)
    except asyncio.TimeoutError:  # nats.errors.TimeoutError is one too
        raise RegistryError(f"NATS at {url} did not answer within {timeout_s * 2:.0f} s") from None
    except nats.errors.Error as e:  # JetStream API errors (e.g. no permission) derive from it
        raise RegistryError(f"cannot read the registry at {url}: {type(e).__name__}: {e}") from None
    finally:
        try:
            await asyncio.wait_for(nc.close(), timeout_s)
        except (asyncio.TimeoutError, nats.errors.Error) as e:  # best effort: the data is read
            logging.getLogger(__name__).debug("closing the connection: %s", e)


def run_status(args: argparse.Namespace) -> int:
    """Print the status. Errors are raised (``parallax``'s main prints one line): unreachable NATS or
    no JetStream exit 2, an unreadable registry 1."""
    if not args.timeout > 0:
        raise UsageError("--timeout must be positive")
    connection_log = logging.getLogger("parallax.broker.connection")
    level = connection_log.level
    connection_log.setLevel(logging.ERROR)  # no per-attempt warnings: the error is the one line
    try:
        snap = asyncio.run(fetch_snapshot(nats_options(args), args.timeout))
    finally:
        connection_log.setLevel(level)
    status = build_status(snap, model=args.model)
    if args.json:
        print(render_json(status))
    elif not snap:
        print("no nodes registered")
    else:
        print(render_table(status))
    return 0
