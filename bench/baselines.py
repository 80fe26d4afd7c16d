"""Single-process transformers baselines and the memory-bandwidth bound, measured with no cluster running.

(a) ``generate`` batch 1; (b) ``generate`` batch N (left padding where lengths differ); (c) a plain
decode loop with ``DynamicCache`` (prefill once, then one token per forward, argmax) at batch 1 and N;
(d) weight bytes read per decode step / measured memory bandwidth. Decode-only rates exclude the
prefill: for ``generate`` they run from the first to the last new token's logits (a logits processor
notes the times). Each measurement is preceded by a warm-up with the same batch size and 8-token prompts."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

BANDWIDTH_BYTES = 512 * 1024 * 1024
BANDWIDTH_REPEATS = 5


def load_model(model_path: str, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _inputs(prompts: Sequence[list[int]], pad_id: int) -> tuple[Any, Any]:
    """Left-padded ids and their attention mask."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    return ids, torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])


def warmup_prompts(prompts: Sequence[list[int]], length: int = 8) -> list[list[int]]:
    """Short copies of the prompts: a warm-up with the real batch size but a cheap prefill."""
    return [p[:length] for p in prompts]


class StepClock:
    """A logits processor that only notes when each new token's logits are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.times.append(time.perf_counter())
        return scores


def generate_rate(model: Any, prompts: Sequence[list[int]], new_tokens: int, pad_id: int) -> dict[str, Any]:
    """``generate`` (greedy, exactly ``new_tokens`` per row): end-to-end tok/s, and decode-only tok/s
    from the first to the last new token's logits (``new_tokens - 1`` forwards)."""
    import torch
    from transformers import LogitsProcessorList

    def run(batch: Sequence[list[int]], n: int, clock: StepClock) -> None:
        ids, mask = _inputs(batch, pad_id)
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=pad_id, logits_processor=LogitsProcessorList([clock]))

    run(warmup_prompts(prompts), 2, StepClock())
    clock = StepClock()
    total = timed(lambda: run(prompts, new_tokens, clock))
    rows, decode_s = len(prompts), clock.times[-1] - clock.times[0] if len(clock.times) > 1 else 0.0
    return {
        "batch": rows,
        "new_tokens": new_tokens,
        "total_s": total,
        "end_to_end_tok_s": rows * new_tokens / total,
        "decode_tok_s": rows * (len(clock.times) - 1) / decode_s if decode_s > 0 else None,
    }


def decode_loop_rate(model: Any, prompts: Sequence[list[int]], new_tokens: int, pad_id: int) -> dict[str, Any]:
    """Prefill once, then one argmax token per forward with a DynamicCache; decode-only tok/s."""
    import torch
    from transformers import DynamicCache

    def prefill(batch: Sequence[list[int]]) -> tuple[Any, Any, Any]:
        ids, mask = _inputs(batch, pad_id)
        mask = None if bool(mask.all()) else mask  # no padding: the plain loop needs no mask
        cache = DynamicCache(config=model.config)
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache, out.logits[:, -1].argmax(-1, keepdim=True), mask

    def decode(state: tuple[Any, Any, Any], steps: int) -> None:
        cache, token, mask = state
        for _ in range(steps):
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            out = model(token, attention_mask=mask, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)

    with torch.inference_mode():
        decode(prefill(warmup_prompts(prompts)), 2)
        started = time.perf_counter()
        state = prefill(prompts)
        prefill_s = time.perf_counter() - started
        decode_s = timed(lambda: decode(state, new_tokens - 1))
    rows = len(prompts)
    return {
        "batch": rows,
        "new_tokens": new_tokens,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "decode_tok_s": rows * (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else None,
        "end_to_end_tok_s": rows * new_tokens / (prefill_s + decode_s),
    }


def memory_bandwidth() -> dict[str, float]:
    """Best of a few runs: a float32 ``sum`` (read GB/s) and a ``copy_`` (read + write GB/s)."""
    import torch

    src = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.float32)
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)

    src.sum(), copy()  # fault the pages in
    read_s = min(timed(src.sum) for _ in range(BANDWIDTH_REPEATS))
    copy_s = min(timed(copy) for _ in range(BANDWIDTH_REPEATS))
    return {"read_gb_s": BANDWIDTH_BYTES / read_s / 1e9, "copy_gb_s": 2 * BANDWIDTH_BYTES / copy_s / 1e9}


def weight_bytes_per_step(model: Any) -> int:
    """Bytes of weights one decode step reads: every parameter once (tied ones once), except an untied
    input embedding, of which a step reads only one row per token."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel() * param.element_size()
    embed = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embed.data_ptr()
    return total if tied else total - embed.numel() * embed.element_size()


def bandwidth_bound(model: Any) -> dict[str, float]:
    bandwidth = memory_bandwidth()
    weights = weight_bytes_per_step(model)
    return {**bandwidth, "weight_bytes_per_step": weights, "bound_tok_s_batch1": bandwidth["read_gb_s"] * 1e9 / weights}


def run_baselines(model_path: str, dtype: str, prompts: Sequence[list[int]], new_tokens: int, batch: int,
                  say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every baseline; ``prompts`` needs at least ``batch`` entries."""
    import torch

    if len(prompts) < batch:
        raise ValueError(f"need {batch} prompts for the batched baselines, got {len(prompts)}")
    model = load_model(model_path, dtype)
    pad_id = model.config.pad_token_id
    pad_id = int(pad_id) if isinstance(pad_id, int) else 0
    one, many = [prompts[0]], list(prompts[:batch])
    try:
        say("baseline: transformers generate, batch 1")
        gen1 = generate_rate(model, one, new_tokens, pad_id)
        say(f"baseline: transformers generate, batch {batch}")
        gen_n = generate_rate(model, many, new_tokens, pad_id)
        say("baseline: decode loop (DynamicCache), batch 1")
        loop1 = decode_loop_rate(model, one, new_tokens, pad_id)
        say(f"baseline: decode loop (DynamicCache), batch {batch}")
        loop_n = decode_loop_rate(model, many, new_tokens, pad_id)
        say("baseline: memory bandwidth")
        bound = bandwidth_bound(model)
    finally:
        del model
        gc.collect()
    return {
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "generate_b1": gen1,
        "generate_batched": gen_n,
        "loop_b1": loop1,
        "loop_batched": loop_n,
        "bandwidth": bound,
    }
