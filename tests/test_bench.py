"""The serving benchmark (`bench/`): pure functions fast, one tiny end-to-end run (slow).

No test asserts on speed: timings depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from bench import report, soak
from bench.client import apply_event, completion_body
from bench.natsstats import StatsClient, merge_peaks, summarize_stages
from bench.prompts import WORDS, build_prompts, sentence, token_prompt
from bench.serve import (
    build_parser,
    config_from_args,
    default_requests,
    kv_bytes_per_token,
    parse_levels,
    run_interruptible,
)
from bench.stats import RequestRecord, decode_aggregate, decode_rate, distribution_ms, percentile, summarize_level
from parallax.procs import pid_alive

REPO = Path(__file__).resolve().parents[1]
RESULT_KEYS = {"machine", "config", "cluster", "levels", "baselines", "prefix_cache", "memory", "targets", "error"}
LEVEL_KEYS = {"concurrency", "requests", "completed", "failed", "wall_s", "completion_tokens", "ttft_ms", "itl_ms",
              "output_tok_s", "req_s", "decode_tok_s_per_stream", "decode_tok_s_aggregate", "nats"}


def fake_encode(text: str) -> list[int]:
    """A stand-in tokenizer: one id per word, stable across processes."""
    return [zlib.crc32(word.encode()) % 50000 for word in text.split()]


def record(start: float, chunks: list[float], tokens: int | None = None, error: str | None = None) -> RequestRecord:
    return RequestRecord(start=start, end=chunks[-1] if chunks else start, chunk_times=chunks,
                         completion_tokens=tokens, error=error)


# ------------------------------------------------------------------------------------ statistics
def test_percentile_interpolates_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="percentile must be in 0..100, got 101"):
        percentile(values, 101)


def test_distribution_is_in_milliseconds():
    dist = distribution_ms([0.001, 0.003])
    assert dist["p50"] == pytest.approx(2.0) and dist["mean"] == pytest.approx(2.0)
    assert distribution_ms([]) == {"p50": None, "p99": None, "mean": None}


def test_request_record_ttft_itl_and_decode():
    r = record(10.0, [10.5, 10.6, 10.8], tokens=3)
    assert r.ok and r.tokens == 3
    assert r.ttft == pytest.approx(0.5)
    assert r.itls == pytest.approx([0.1, 0.2])
    assert decode_rate([r]) == pytest.approx(2 / 0.3)
    assert not record(0.0, [], error="boom").ok
    assert record(0.0, [1.0, 2.0]).tokens == 2  # no usage chunk: one token per text chunk


def test_summarize_level_counts_failures_and_rates():
    ok = [record(0.0, [1.0, 1.5, 2.0], tokens=3), record(0.0, [2.0, 3.0], tokens=2)]
    failed = record(0.0, [], error="HTTP 503: no stage")
    summary = summarize_level([*ok, failed], concurrency=2, wall_s=5.0)
    assert (summary["requests"], summary["completed"], summary["failed"]) == (3, 2, 1)
    assert summary["completion_tokens"] == 5
    assert summary["output_tok_s"] == pytest.approx(1.0)
    assert summary["req_s"] == pytest.approx(0.4)
    assert summary["ttft_ms"]["p50"] == pytest.approx(1500.0)
    assert summary["itl_ms"]["p50"] == pytest.approx(500.0)
    assert summary["errors"] == ["HTTP 503: no stage"]


def test_decode_aggregate_counts_only_while_every_stream_decodes():
    """Stream a decodes 1.0..3.0, b starts late (prefill) at 2.0 and ends at 4.0: the window is 2.0..3.0, where a's
    chunks at 2.5 and 3.0 and b's at 2.5 and 3.0 arrive (b's first chunk opens the window): 4 chunks per second."""
    a, b = record(0.0, [1.0, 1.5, 2.0, 2.5, 3.0]), record(0.0, [2.0, 2.5, 3.0, 3.5, 4.0])
    assert decode_aggregate([a, b]) == pytest.approx(4.0)
    assert decode_aggregate([record(0.0, [1.0])]) is None  # one chunk: no decode to time


# ---------------------------------------------------------------------------------------- client
def test_apply_event_reads_text_usage_errors_and_done():
    r = RequestRecord(start=0.0)
    assert not apply_event(r, '{"choices":[{"text":"Hi","index":0}]}', 1.0)
    assert not apply_event(r, '{"choices":[{"text":"","index":0,"finish_reason":"length"}]}', 2.0)
    assert not apply_event(r, '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":4}}', 3.0)
    assert apply_event(r, "[DONE]", 4.0)
    assert r.chunk_times == [1.0] and r.completion_tokens == 4 and r.prompt_tokens == 5 and r.error is None
    bad = RequestRecord(start=0.0)
    assert apply_event(bad, '{"error":{"message":"stage gone","type":"x"}}', 1.0)
    assert bad.error == "stage gone"


def test_completion_body_forces_the_length():
    body = completion_body("m", [1, 2, 3], 8)
    assert body["ignore_eos"] is True and body["temperature"] == 0.0 and body["max_tokens"] == 8
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert "model" not in completion_body(None, [1], 1)


# --------------------------------------------------------------------------------------- prompts
def test_prompt_set_is_deterministic_for_a_seed():
    def make(seed: int):
        return build_prompts(fake_encode, seed, 32, [3, 2], prefix_len=100, suffix_len=8, memory_requests=2, memory_len=50)

    a, b, c = make(7), make(7), make(8)
    assert a == b
    assert a != c
    assert [len(p) for level in a.levels for p in level] == [32] * 5
    assert len(a.prefix) == 100 and len(a.suffix_a) == len(a.suffix_b) == 8 and a.suffix_a != a.suffix_b
    assert [len(p) for p in a.memory] == [50, 50]
    every = [tuple(p) for p in (*a.warmup, *a.levels[0], *a.levels[1], *a.memory)]
    assert len(set(every)) == len(every)


def test_token_prompt_is_exact_and_uses_the_word_list():
    import random

    ids = token_prompt(random.Random(1), fake_encode, 17)
    assert len(ids) == 17
    words = sentence(random.Random(1)).rstrip(".").lower().split()
    assert all(w in WORDS for w in words)
    with pytest.raises(ValueError, match="at least one token, got 0"):
        token_prompt(random.Random(1), fake_encode, 0)



@pytest.mark.slow
def test_prompt_set_with_the_real_tokenizer(smollm2_path: Path):
    from bench.prompts import tokenizer_encoder

    encode = tokenizer_encoder(str(smollm2_path))
    a = build_prompts(encode, 3, 128, [2], prefix_len=64, memory_requests=1, memory_len=200)
    assert a == build_prompts(encode, 3, 128, [2], prefix_len=64, memory_requests=1, memory_len=200)
    assert [len(p) for p in a.levels[0]] == [128, 128] and len(a.memory[0]) == 200

# ------------------------------------------------------------------------------------ NATS stats
def test_stage_stats_tolerate_missing_keys():
    replies = [
        {"node_id": "b", "start": 15, "end": 30, "busy_s": 2.0, "hop_ms": {"p50": 0.8}},
        {"node_id": "a", "start": 0, "end": 15, "busy_s": 1.0, "hop_ms": {"p50": 0.5, "p99": 2.0}},
        {"node_id": "c"},
    ]
    summary = summarize_stages(replies, wall_s=4.0)
    assert [s["stage"] for s in summary["stages"]] == ["0:15", "15:30", "c"]
    assert summary["nats_hop_p50_ms"] == pytest.approx(0.8)
    assert [s["busy_frac"] for s in summary["stages"]] == [0.25, 0.5, None]
    assert summarize_stages([], 1.0) == {"stages": [], "nats_hop_p50_ms": None}
    assert "n/a" in report.busy_cell(summary["stages"])


def test_merge_peaks_keeps_the_largest():
    peaks: dict = {}
    merge_peaks(peaks, [{"node_id": "a", "rss_bytes": 10, "kv": {"blocks_used": 3}}])
    merge_peaks(peaks, [{"node_id": "a", "rss_bytes": 5, "kv": {"blocks_used": 7}}, {"node_id": "b"}])
    assert peaks["a"]["peak_rss_bytes"] == 10 and peaks["a"]["peak_kv_blocks_used"] == 7
    assert peaks["b"]["peak_rss_bytes"] is None


def test_stats_client_without_nats_answers_nothing():
    assert asyncio.run(StatsClient(None).reset()) == []


# ---------------------------------------------------------------------------------------- report
def sample_results() -> dict:
    level1 = summarize_level([record(0.0, [0.1, 0.2, 0.3], tokens=3)], 1, 1.0)
    level1["nats"] = summarize_stages([{"start": 0, "end": 15, "busy_s": 0.5, "hop_ms": {"p50": 0.4}}], 1.0)
    level16 = summarize_level([record(0.0, [0.1, 0.2], tokens=2)] * 16, 16, 1.0)
    level16["nats"] = summarize_stages([], 1.0)
    return {
        "machine": {"cpu": "test cpu", "cores": 2},
        "config": {"model": "m", "stages": 2},
        "levels": [level1, level16],
        "baselines": {"batch": 16, "generate_b1": {"decode_tok_s": 5.0}, "loop_batched": {"decode_tok_s": 10.0},
                      "bandwidth": {"read_gb_s": 20.0, "weight_bytes_per_step": 2**20, "bound_tok_s_batch1": 1.0}},
        "prefix_cache": {"ttft_a_ms": 1000.0, "ttft_b_ms": 400.0},
        "memory": None,
        "targets": [],
    }


def test_targets_pass_fail_and_na():
    targets = report.compute_targets(sample_results())
    assert [t["result"] for t in targets] == ["PASS", "PASS", "FAIL", "PASS", "n/a"]
    assert targets[1]["threshold"] == pytest.approx(12.0) and targets[2]["threshold"] == pytest.approx(300.0)


def test_markdown_tables():
    assert report.fmt(None) == "n/a" and report.fmt(1.234, 2) == "1.23" and report.fmt(3) == "3"
    assert report.table(["a", "b"], [["1", "2"]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    results = sample_results()
    results["targets"] = report.compute_targets(results)
    text = report.markdown(results)
    levels = report.levels_table(results["levels"]).splitlines()
    assert len(levels) == 4 and levels[0].count("|") == len(report.LEVEL_HEADERS) + 1
    assert levels[2].startswith("| 1 | 1 | 1 |") and "0:15: 50%" in levels[2]
    for heading in ("## Serving", "## Baselines", "## Prefix cache", "## Memory", "## Targets"):
        assert heading in text
    assert "FAIL" in text and "test cpu" in text


def test_write_results(tmp_path: Path):
    results = sample_results()
    json_path, md_path = report.write_results(results, tmp_path / "out")
    assert json.loads(json_path.read_text())["levels"][0]["concurrency"] == 1
    assert md_path.read_text().startswith("# Parallax-NATS serving benchmark")


def test_cpu_model_from_cpuinfo():
    assert report.cpu_model("processor : 0\nmodel name\t: AMD EPYC 7B13\n") == "AMD EPYC 7B13"


def test_busy_machine_warning():
    assert report.busy_warning({"load_avg_at_start": [0.1, 0.2, 0.3], "cores": 2}) is None
    assert report.busy_warning({"load_avg_at_start": None}) is None
    assert "load average 2.50 on 2 cores" in report.busy_warning({"load_avg_at_start": [2.5, 1.0, 1.0], "cores": 2})


# ------------------------------------------------------------------------------------------ args
def test_args_and_defaults():
    assert parse_levels("1, 4,16") == (1, 4, 16)
    assert [default_requests(c) for c in (1, 4, 16, 64)] == [8, 8, 32, 64]
    cfg = config_from_args(build_parser().parse_args(["--levels", "1,2", "--extra-up-args", "--ready-timeout 60"]))
    assert cfg.levels == (1, 2) and cfg.requests == (8, 8)
    assert cfg.extra_up_args == ("--ready-timeout", "60")
    assert config_from_args(build_parser().parse_args(["--requests-per-level", "3"])).requests == (3, 3, 3, 3)


def test_kv_bytes_per_token():
    config = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
    assert kv_bytes_per_token(config, "bfloat16") == 2 * 30 * 3 * 64 * 2
    assert kv_bytes_per_token({}, "float32") is None


# ------------------------------------------------------------------------------------------- soak
def test_soak_args_defaults_and_restart_period():
    cfg = soak.config_from_args(soak.build_parser().parse_args([]))
    assert cfg == soak.SoakConfig() and cfg.minutes == 20 and cfg.restart_period_s == 240  # every 4 of 20 minutes
    short = soak.config_from_args(soak.build_parser().parse_args(["--minutes", "3", "--stage-args", "--threads 1"]))
    assert short.restart_period_s == 60 and short.stage_args == ("--threads", "1")
    assert soak.SoakConfig(minutes=3, restart_every_s=45).restart_period_s == 45
    assert soak.SoakConfig(minutes=0).restart_period_s == 240
    with pytest.raises(ValueError, match="--concurrency must be at least 1"):
        soak.SoakConfig(concurrency=0)
    assert soak.main(["--minutes", "-1"]) == 2  # a clear error before anything starts


def test_soak_judges_every_request():
    ref = "The quick brown fox"
    assert soak.judge("stream", ref, ref, None, True).status == "ok"
    assert soak.judge("plain", "The quick brown cat", ref, None, True).status == "wrong"
    assert soak.judge("stream", "The quick", ref, None, False).status == "wrong"  # ended without [DONE]
    assert soak.judge("disconnect", "The quick", ref, None, False).status == "disconnected"
    assert soak.judge("disconnect", "A quick", ref, None, False).status == "wrong"
    aborted = {"message": "request cmpl-1 was aborted", "code": "request_aborted"}
    assert soak.judge("abort", "The", ref, aborted, True).status == "aborted"
    assert soak.judge("abort", "Th3", ref, aborted, True).status == "wrong"
    draining = {"message": "stage b0 is shutting down", "code": "stage_failed"}
    assert soak.judge("stream", "", ref, draining, True) == soak.Outcome("stream", "error", "stage b0 is shutting down")
    assert soak.judge("plain", "", ref, {}, True).status == "unclear"
    assert soak.error_key("request cmpl-9f3a was aborted on 4a5b6c7d8e after 12.5 s") == "request # was aborted on # after N s"
    log = ("request r1: stage 15:30 no longer caches the prompt's prefix; resubmitting with 0 tokens so far\n"
           "request r2: stage b0 left layers 15:30: the stage is shutting down; resubmitting with 6 tokens so far\n"
           "request r2: stage b0 serving layers 15:30 stopped while serving the request; resuming on live replicas with 6 tokens so far\n")
    assert soak.resumed_tries(log) == 2  # the fresh resubmission (0 tokens) does not count


def test_soak_rss_drift_after_warmup():
    flat = [(-5.0, 100)] + [(float(t), 1000 + t % 3) for t in range(0, 100, 10)]
    assert soak.rss_drift(flat, warmup_s=0) == pytest.approx(0.0, abs=0.01)
    growing = [(float(t), 1000 + 10 * t) for t in range(0, 200, 10)]
    assert soak.rss_drift(growing, warmup_s=60) == pytest.approx((2800 - 1700) / 1700)  # medians of t 60-80 and 170-190
    assert soak.rss_drift(growing[:8], warmup_s=60) is None  # two samples after warm-up: no drift


# ------------------------------------------------------------------------------------ end to end
TINY_RUN = ["--levels", "1,2", "--requests-per-level", "2", "--output-len", "4", "--input-len", "16",
            "--skip-baselines", "--skip-memory", "--skip-prefix"]


def assert_all_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if pid_alive(p)]


async def _shrugs_off_one_cancel(ended: list[str]) -> None:
    """Like Python 3.11's wait_for when its awaitable completes as the cancel lands: the cancel is lost."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        ended.append("first cancel swallowed")
    await asyncio.sleep(30)
    ended.append("ran to the end")


@pytest.mark.usefixtures("sigint_default")
def test_ctrl_c_stops_the_phases_even_when_one_cancel_is_swallowed():
    ended: list[str] = []
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        run_interruptible(_shrugs_off_one_cancel(ended))
    assert time.monotonic() - started < 5
    assert ended == ["first cancel swallowed"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.usefixtures("sigint_default")
def test_phases_that_finish_return_normally():
    async def phases() -> None:
        await asyncio.sleep(0)

    run_interruptible(phases())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_benchmark_end_to_end_tiny(tmp_path: Path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench.serve", *TINY_RUN, "--out", str(out)], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "latest.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["error"] is None
    assert [lv["concurrency"] for lv in results["levels"]] == [1, 2]
    for lv in results["levels"]:
        assert LEVEL_KEYS <= set(lv)
        assert lv["completed"] == 2 and lv["completion_tokens"] == 8
    assert {"cpu", "cores", "torch", "date"} <= set(results["machine"])
    assert len(results["targets"]) == 5
    assert "| concurrency |" in (out / "latest.md").read_text()
    pids = results["cluster"]["pids"]
    assert len(pids) >= 4  # parallax up, nats-server, 2 stages, gateway
    assert_all_gone(pids)



# ------------------------------------------------------------------- synthetic model, side by side
def llama_cpp_rows(heads: int, head_dim: int) -> list[int]:
    """HF row stored at each llama.cpp row: within a head, rotary pair j (HF rows j and j + head_dim/2)
    becomes rows 2j and 2j + 1 (convert_hf_to_gguf's permute, written out row by row)."""
    half = head_dim // 2
    return [h * head_dim + r * half + j for h in range(heads) for j in range(half) for r in range(2)]


def test_synth_permutes_q_and_k_rows_like_llama_cpp():
    import numpy as np

    from bench.synth import permute_llama

    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)  # 3 heads of head_dim 8, 5 inputs
    assert np.array_equal(permute_llama(w, 3), w[llama_cpp_rows(3, 8)])


def test_synth_config_sizes_and_validation():
    from bench.synth import TINY, SynthConfig, _shard_plan

    cfg = SynthConfig()
    assert 1.0e9 < cfg.parameters() < 1.2e9 and cfg.head_dim == 64
    names = [name for name, _ in cfg.tensors()]
    assert len(names) == 2 + 9 * 22 and "lm_head.weight" not in names
    shards = list(_shard_plan(cfg.tensors(), 512 * 1024 * 1024))
    assert [n for shard in shards for n in shard] == names and len(shards) == 5
    assert TINY.parameters() < 5e6
    with pytest.raises(ValueError, match="do not divide"):
        SynthConfig(heads=3)
    with pytest.raises(ValueError, match="multiples of 32"):
        SynthConfig(hidden=48, heads=1, kv_heads=1)


@pytest.mark.slow
def test_synth_tiny_writes_one_model_three_ways(tmp_path: Path, smollm2_path: Path):
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    from bench.synth import TINY
    from parallax.broker.model import smollm2_gguf

    proc = subprocess.run([sys.executable, "-m", "bench.synth", "--tiny", "--out", str(tmp_path)], cwd=REPO,
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = tmp_path / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["hidden_size"] == 64 and config["num_key_value_heads"] == 2 and config["tie_word_embeddings"]
    tensors = {}
    for shard in hf.glob("*.safetensors"):
        tensors.update(load_file(shard))
    assert len(tensors) == len(TINY.tensors()) and all(t.dtype == torch.bfloat16 for t in tensors.values())
    q_proj = tensors["model.layers.1.self_attn.q_proj.weight"].float().numpy()
    assert 0.015 < q_proj.std() < 0.025
    smol_tokens = GGUFReader(smollm2_gguf()).fields["tokenizer.ggml.tokens"].contents()
    # a value's error: half a step (Q8_0 step = absmax/127, its fp16 scale adds a little), Q4_0 up to one step
    # (scale = signed absmax / -8, levels -8..7: a value of the other sign near absmax clamps to 7)
    for qtype, bound in (("Q8_0", 0.6 / 127), ("Q4_0", 1.05 / 8)):
        reader = GGUFReader(tmp_path / f"synth-{qtype.lower()}.gguf")
        by_name = {t.name: t for t in reader.tensors}
        assert "output.weight" not in by_name and len(by_name) == len(TINY.tensors())
        assert by_name["token_embd.weight"].tensor_type == GGMLQuantizationType.Q8_0
        assert by_name["blk.0.ffn_down.weight"].tensor_type == GGMLQuantizationType[qtype]
        assert by_name["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
        assert reader.fields["llama.attention.head_count_kv"].contents() == 2
        assert reader.fields["tokenizer.ggml.tokens"].contents() == smol_tokens
        for name, hf_name, heads in (("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight", 4),
                                     ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight", 2),
                                     ("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight", None)):
            t = by_name[name]
            stored = dequantize(np.asarray(t.data), t.tensor_type).reshape(tensors[hf_name].shape)
            expected = tensors[hf_name].float().numpy()
            if heads is not None:
                expected = expected[llama_cpp_rows(heads, 16)]
            block_max = np.abs(expected).reshape(-1, 32).max(axis=1, keepdims=True)
            err = np.abs(stored - expected).reshape(-1, 32)
            assert (err <= block_max * bound + 1e-6).all(), name  # a wrong row order: errors ~ absmax
    summary = json.loads((tmp_path / "synth.json").read_text())
    assert summary["parameters"] == TINY.parameters() and summary["q4_0"]["bytes"] > 0


def test_side_by_side_targets_and_table():
    from bench import side_by_side as sbs

    def stage(layers: str, rss: float, weights: float, kv: float) -> dict:
        return {"stage": layers, "pid": 1, "peak_rss_bytes": int(rss * 1e9), "weight_bytes": int(weights * 1e9),
                "kv_budget_bytes": int(kv * 1e9)}

    def cluster(single: float, batch: float, stages: list[dict]) -> dict:
        return {"single": {"decode_tok_s_per_stream": single, "completion_tokens": 128},
                "batch": {"decode_tok_s_aggregate": batch, "output_tok_s": batch / 2, "completion_tokens": 2048},
                "per_stage": stages}

    q4 = {"model": "synth-q4_0", "gguf_bytes": int(0.6e9),
          "llamacpp": {"decode_tok_s": 20.0, "tokens": 128, "peak_rss_bytes": int(0.8e9)},
          "step": {"decode_tok_s": 25.0, "tokens": 128},
          "parallax1": cluster(21.0, 60.0, [stage("0:22", 1.6, 0.6, 0.25)]),
          "parallax2": cluster(16.0, 60.0, [stage("0:11", 1.0, 0.35, 0.25), stage("11:22", 1.6, 0.35, 0.25)])}
    bf16 = {"model": "smollm2-bf16", "gguf_bytes": None,
            "transformers": {"b1": {"decode_tok_s": 30.0, "new_tokens": 128},
                             "batched": {"decode_tok_s": 200.0, "batch": 16, "new_tokens": 128}},
            "parallax1": cluster(40.0, 320.0, []), "parallax2": {"error": "ClusterError: boom"}}
    verdicts = {t["target"]: t["verdict"] for t in sbs.targets([q4, bf16])}
    assert verdicts["synth-q4_0: --stages 1 single stream / llama.cpp"] == "PASS"  # 21 / 20
    assert verdicts["synth-q4_0: --stages 2 single stream / llama.cpp"] == "FAIL"  # 16 / 20 < 0.85
    assert verdicts["smollm2-bf16: --stages 1 aggregate / transformers loop batch"] == "PASS"  # 320 / 200
    assert verdicts["smollm2-bf16: --stages 2 aggregate / transformers loop batch"] == "n/a"
    assert verdicts["synth-q4_0 parallax2 stage 0:11: RSS / (1.15 w + kv + 0.7 GB)"] == "PASS"  # 1.0 <= 1.35
    assert verdicts["synth-q4_0 parallax2 stage 11:22: RSS / (1.15 w + kv + 0.7 GB)"] == "FAIL"  # 1.6 > 1.35
    assert verdicts["synth-q4_0 parallax2 stage 11:22: RSS / 1.5 GB"] == "FAIL"
    assert verdicts["synth-q4_0 parallax2 stage 0:11: RSS / 1.5 GB"] == "PASS"
    doc = {"machine": report.machine_info(), "cpu_flags": "avx2", "results": [q4, bf16],
           "settings": {"threads": 2, "new_tokens": 128, "input_len": 64, "streams": 16},
           "targets": sbs.targets([q4, bf16])}
    text = sbs.markdown(doc)
    assert "| synth-q4_0 | llamacpp | 128 | 20.0 | n/a | n/a |" in text
    assert "| synth-q4_0 | parallax1 | 128 / 2048 | 21.0 | 60.0 | 30.0 |" in text
    assert "| synth-q4_0 | step | 128 | 25.0 | n/a | n/a |" in text
    assert "One stream served / the step in process: synth-q4_0: --stages 1 0.84, --stages 2 0.64." in text
    assert "| smollm2-bf16 | parallax2 | ClusterError: boom | n/a | n/a | n/a |" in text
    assert "- smollm2-bf16 parallax2: ClusterError: boom" in text


def test_side_by_side_takes_the_median_single_run():
    from bench.side_by_side import median_run

    runs = [{"rate": 90.0}, {"rate": None}, {"rate": 120.0}, {"rate": 100.0}]
    assert median_run(runs[:3], "rate") == {"rate": 120.0}  # 90, 120, then the run without a rate
    assert median_run([runs[0], runs[2], runs[3]], "rate") == {"rate": 100.0}
    assert median_run(runs[:1], "rate") == {"rate": 90.0}


def test_side_by_side_runs_single_streams_in_rounds():
    """One single stream of each system per round, in turn (drift moves a round's runs alike); a system that
    fails is reported once and the others go on."""
    from bench.side_by_side import interleave

    order, failures = [], []

    class Fake:
        def __init__(self, name: str, fails_at: int | None = None):
            self.name, self.fails_at, self.runs = name, fails_at, 0

        def single(self) -> None:
            self.runs += 1
            order.append(self.name)
            if self.runs == self.fails_at:
                raise RuntimeError(f"{self.name} died")

        def finish(self) -> dict:
            return {}

    contenders = {"llamacpp": Fake("llamacpp"), "parallax1": Fake("parallax1", fails_at=2), "parallax2": Fake("parallax2")}
    interleave(contenders, 3, lambda system, exc: failures.append((system, str(exc))))
    assert order == ["llamacpp", "parallax1", "parallax2"] * 2 + ["llamacpp", "parallax2"]
    assert failures == [("parallax1", "parallax1 died")]
    assert list(contenders) == ["llamacpp", "parallax2"]


def test_side_by_side_step_worker_answers_each_round():
    """bench.side_by_side's ``step`` worker, as the benchmark runs it (its own process, the job then one line per
    run on stdin): ready once loaded, one decode rate per line, the kernels it picked and its peak RSS at the end."""
    job = {"model": "smollm2-135m", "threads": 2, "new_tokens": 5, "prompt": list(range(100, 120)), "warmup": [1, 2, 3]}
    done = subprocess.run([sys.executable, "-m", "bench.side_by_side", "--worker", "step"], cwd=REPO, timeout=300,
                          input=json.dumps(job) + "\nsingle\nsingle\n", capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[0] == {"ready": True} and len(lines) == 4
    for run in lines[1:3]:
        assert run["tokens"] == 5 and run["decode_tok_s"] > 0 and run["prefill_s"] > 0
    assert lines[3]["peak_rss_bytes"] > 0 and lines[3]["kernels"]


def test_side_by_side_rejects_bad_options(capsys):
    from bench.side_by_side import main

    assert main(["--models", "nope"]) == 2
    assert "unknown model nope" in capsys.readouterr().err
    assert main(["--new-tokens", "1"]) == 2
    assert main(["--single-runs", "0"]) == 2
