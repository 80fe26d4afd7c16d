"""Machine description, targets with PASS/FAIL, markdown tables and the JSON/markdown files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

NA = "n/a"
MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------- machine
def cpu_model(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or NA
    for line in cpuinfo.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or NA


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "load_avg_at_start": load_average(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine skews every number here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def busy_warning(machine: dict[str, Any], threshold: float = 0.5) -> str | None:
    """A sentence when the 1-minute load average at the start says other work was running."""
    load, cores = machine.get("load_avg_at_start"), machine.get("cores") or 1
    if not load or load[0] <= threshold:
        return None
    return (f"load average {load[0]:.2f} on {cores} cores at the start: other processes were using the CPU, "
            "so the numbers here (baselines included) may be skewed; compare runs from a quiet machine")


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------- targets
def _get(data: Any, *path: Any) -> Any:
    for key in path:
        if isinstance(data, dict):
            data = data.get(key)
        elif isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data):
            data = data[key]
        else:
            return None
    return data


def level(results: dict[str, Any], concurrency: int) -> dict[str, Any] | None:
    return next((lv for lv in results.get("levels") or [] if lv.get("concurrency") == concurrency), None)


def target(name: str, value: float | None, threshold: float | None, op: str, unit: str = "") -> dict[str, Any]:
    """``value op threshold`` with op '>=' or '<='; PASS/FAIL, or n/a when either side is missing."""
    if value is None or threshold is None:
        verdict = NA
    else:
        verdict = "PASS" if (value >= threshold if op == ">=" else value <= threshold) else "FAIL"
    return {"name": name, "value": value, "op": op, "threshold": threshold, "unit": unit, "result": verdict}


def _times(factor: float, value: float | None) -> float | None:
    return None if value is None else factor * value


def compute_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    base = results.get("baselines") or {}
    prefix = results.get("prefix_cache") or {}
    memory = results.get("memory") or {}
    levels = results.get("levels") or []
    lowest = min(levels, key=lambda lv: lv["concurrency"]) if levels else None
    batch = base.get("batch", 16)
    return [
        target("c=1 decode tok/s >= 1.5x HF generate batch 1 (decode)",
               _get(level(results, 1), "decode_tok_s_per_stream"),
               _times(1.5, _get(base, "generate_b1", "decode_tok_s")), ">=", "tok/s"),
        target(f"c={batch} output tok/s >= 1.2x plain decode loop batch {batch}",
               _get(level(results, batch), "output_tok_s"),
               _times(1.2, _get(base, "loop_batched", "decode_tok_s")), ">=", "tok/s"),
        target("prefix cache TTFT_B <= 0.3 TTFT_A", prefix.get("ttft_b_ms"),
               _times(0.3, prefix.get("ttft_a_ms")), "<=", "ms"),
        target(f"NATS hop p50 <= 1 ms (c={lowest['concurrency'] if lowest else '?'}, worst stage)",
               _get(lowest, "nats", "nats_hop_p50_ms"), 1.0, "<=", "ms"),
        target(f"{memory.get('requests', 64)} x {memory.get('prompt_len', 1000)}-token requests all finish",
               memory.get("completed"), memory.get("requests"), ">=", "requests"),
    ]


# --------------------------------------------------------------------------------------- markdown
def fmt(value: Any, digits: int = 1) -> str:
    """Numbers with ``digits`` decimals, None as n/a, anything else as str."""
    if value is None:
        return NA
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def pct(fraction: float | None) -> str:
    return NA if fraction is None else f"{100 * fraction:.0f}%"


def mib(value: float | None) -> str:
    return NA if value is None else f"{value / MiB:.0f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


LEVEL_HEADERS = ("concurrency", "requests", "ok", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
                 "output tok/s", "req/s", "decode tok/s/stream", "NATS hop p50 ms", "stage busy %")


def busy_cell(stages: Sequence[dict[str, Any]]) -> str:
    cells = [f"{s['stage']}: {pct(s.get('busy_frac'))}" for s in stages]
    return ", ".join(cells) if cells else NA


def level_row(lv: dict[str, Any]) -> list[str]:
    nats = lv.get("nats") or {}
    return [
        fmt(lv["concurrency"]), fmt(lv["requests"]), fmt(lv["completed"]),
        fmt(_get(lv, "ttft_ms", "p50")), fmt(_get(lv, "ttft_ms", "p99")),
        fmt(_get(lv, "itl_ms", "p50")), fmt(_get(lv, "itl_ms", "p99")),
        fmt(lv.get("output_tok_s")), fmt(lv.get("req_s"), 2), fmt(lv.get("decode_tok_s_per_stream")),
        fmt(nats.get("nats_hop_p50_ms"), 2), busy_cell(nats.get("stages") or []),
    ]


def levels_table(levels: Sequence[dict[str, Any]]) -> str:
    return table(LEVEL_HEADERS, [level_row(lv) for lv in levels])


def baselines_table(base: dict[str, Any]) -> str:
    batch = base.get("batch", "N")
    rows = [
        ["transformers generate", "1", fmt(_get(base, "generate_b1", "decode_tok_s")), fmt(_get(base, "generate_b1", "end_to_end_tok_s"))],
        ["transformers generate (left padding)", str(batch), fmt(_get(base, "generate_batched", "decode_tok_s")),
         fmt(_get(base, "generate_batched", "end_to_end_tok_s"))],
        ["decode loop, DynamicCache", "1", fmt(_get(base, "loop_b1", "decode_tok_s")), fmt(_get(base, "loop_b1", "end_to_end_tok_s"))],
        ["decode loop, DynamicCache", str(batch), fmt(_get(base, "loop_batched", "decode_tok_s")),
         fmt(_get(base, "loop_batched", "end_to_end_tok_s"))],
        ["bound: weight bytes / read bandwidth", "1", fmt(_get(base, "bandwidth", "bound_tok_s_batch1")), NA],
    ]
    bw = base.get("bandwidth") or {}
    note = (f"\n\nRead bandwidth {fmt(bw.get('read_gb_s'))} GB/s (float32 sum), copy {fmt(bw.get('copy_gb_s'))} GB/s "
            f"(read + write); {mib(bw.get('weight_bytes_per_step'))} MiB of weights per decode step; "
            f"{base.get('dtype')}, {base.get('threads')} torch threads.")
    return table(("baseline", "batch", "decode tok/s", "end-to-end tok/s"), rows) + note


def prefix_section(prefix: dict[str, Any]) -> str:
    rows = [[fmt(prefix.get("prefix_len")), fmt(prefix.get("suffix_len")), fmt(prefix.get("ttft_a_ms")),
             fmt(prefix.get("ttft_b_ms")), pct(prefix.get("ratio")), fmt(prefix.get("prefix_hit_tokens")),
             fmt(prefix.get("error"))]]
    return table(("prefix tokens", "suffix tokens", "TTFT_A ms", "TTFT_B ms", "B/A", "prefix hit tokens (stages)", "error"), rows)


def memory_section(memory: dict[str, Any]) -> str:
    head = (f"{memory.get('completed')}/{memory.get('requests')} requests of {memory.get('prompt_len')} prompt tokens "
            f"(+{memory.get('max_tokens')} new) finished in {fmt(memory.get('wall_s'))} s; TTFT p50 "
            f"{fmt(_get(memory, 'ttft_ms', 'p50'))} ms, p99 {fmt(_get(memory, 'ttft_ms', 'p99'))} ms; "
            f"KV needed by the whole model: {mib(memory.get('kv_bytes_needed'))} MiB.")
    if memory.get("errors"):
        head += f" Errors: {'; '.join(memory['errors'])}"
    rows = [[s["stage"], mib(s.get("peak_rss_bytes")), mib(s.get("kv_budget_bytes")),
             f"{fmt(s.get('peak_kv_blocks_used'), 0)}/{fmt(s.get('kv_blocks_total'), 0)}"]
            for s in memory.get("stages") or []]
    body = table(("stage", "peak RSS MiB", "KV budget MiB", "peak KV blocks used/total"), rows) if rows else "Stage stats: n/a"
    return f"{head}\n\n{body}"


def targets_table(targets: Sequence[dict[str, Any]]) -> str:
    rows = [[t["name"], fmt(t["value"], 2), f"{t['op']} {fmt(t['threshold'], 2)}", t["result"]] for t in targets]
    return table(("target", "value", "threshold", "result"), rows)


def _section(title: str, data: Any, render: Callable[[Any], str]) -> str:
    return f"## {title}\n\n" + (render(data) if data else "skipped") + "\n"


def markdown(results: dict[str, Any]) -> str:
    m, c = results.get("machine") or {}, results.get("config") or {}
    lines = [
        "# Parallax-NATS serving benchmark",
        "",
        (f"{m.get('date')}; {m.get('cpu')}, {m.get('cores')} cores; torch {m.get('torch')}, transformers "
         f"{m.get('transformers')}; load average at start {m.get('load_avg_at_start')}, "
         f"at end {m.get('load_avg_at_end')}; commit {m.get('git_commit')}"),
        "",
        (f"Model {c.get('model')}, {c.get('stages')} stages, {c.get('dtype')}; prompts {c.get('input_len')} "
         f"tokens, {c.get('output_len')} new tokens (greedy, ignore_eos), seed {c.get('seed')}; "
         f"gateway {_get(results, 'cluster', 'url')}"),
        "",
        _section("Serving", results.get("levels"), levels_table),
        _section("Baselines (cluster stopped)", results.get("baselines"), baselines_table),
        _section("Prefix cache", results.get("prefix_cache"), prefix_section),
        _section("Memory", results.get("memory"), memory_section),
        _section("Targets", results.get("targets"), targets_table),
    ]
    warning = busy_warning(m)
    if warning:
        lines.insert(4, f"**Warning:** {warning}.\n")
    if results.get("error"):
        lines.append(f"**Incomplete run:** {results['error']}\n")
    return "\n".join(lines)


def write_results(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "latest.json", out_dir / "latest.md"
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md_path.write_text(markdown(results))
    return json_path, md_path
