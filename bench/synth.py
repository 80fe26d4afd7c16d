"""A synthetic Llama with seeded random weights, for measuring memory and speed where weights dominate.

    python -m bench.synth                       # ~1.1B parameters in ~/.cache/parallax/bench/synth-1b
    python -m bench.synth --tiny --out /tmp/t   # a few MB, for tests

TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads) with SmolLM2's
tokenizer (vocab 49152), so the gateway and llama.cpp tokenize it. Weights are N(0, 0.02) (norms 1), drawn
per tensor from a seed derived from ``--seed`` and the tensor's name. Outputs in ``--out``:

- ``hf/``: a bf16 safetensors folder (sharded, with ``model.safetensors.index.json``), config.json,
  generation_config.json and SmolLM2's tokenizer files;
- ``synth-q8_0.gguf`` and ``synth-q4_0.gguf``: the same bf16 weights quantized with ``gguf.quants``
  (token embedding Q8_0 in both, as in the bundled SmolLM2 GGUF; tied ``lm_head``; norms F32), q/k rows
  permuted as llama.cpp's ``convert_hf_to_gguf.py`` does for llama, llama metadata and SmolLM2's tokenizer
  metadata copied from the bundled GGUF.

Tensors are made, written and quantized one at a time (peak memory: one shard of ``--shard-mb`` plus one
tensor in float32), so the 1B model needs about 1-2 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parallax.broker.model import default_cache_dir

DEFAULT_OUT = default_cache_dir() / "bench" / "synth-1b"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
GGUF_TYPES = ("q8_0", "q4_0")
EMBED_QTYPE = "q8_0"
QUANT_CHUNK_ROWS = 4096  # rows quantized at a time (bounds the float32 scratch of a large embedding)


@dataclass(frozen=True)
class SynthConfig:
    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 49152  # SmolLM2's tokenizer
    context: int = 2048
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.hidden, self.intermediate, self.layers, self.heads, self.kv_heads, self.vocab) < 1:
            raise ValueError(f"every size must be positive: {self}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden {self.hidden} / heads {self.heads} / kv_heads {self.kv_heads} do not divide")
        if (self.hidden // self.heads) % 2:
            raise ValueError("head_dim must be even (rotary)")
        if self.hidden % 32 or self.intermediate % 32:
            raise ValueError("hidden and intermediate must be multiples of 32 (the GGUF block size)")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """HF names and shapes, in file order (tied embeddings: no lm_head)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                    (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                    (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i))]
        return out + [("model.norm.weight", (h,))]

    def parameters(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.tensors())


TINY = SynthConfig(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, context=512)


def say(line: str) -> None:
    print(f"synth {time.strftime('%H:%M:%S')}: {line}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------- weights
def make_tensor(cfg: SynthConfig, name: str, shape: tuple[int, ...]):
    """N(0, std) in bf16 for matrices, ones for norms; seeded by (seed, name), so order does not matter."""
    import torch

    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * cfg.std).to(torch.bfloat16)


def hf_config(cfg: SynthConfig, source: Path) -> dict:
    """config.json of a LlamaForCausalLM with SmolLM2's special token ids."""
    from transformers import LlamaConfig

    src = json.loads((source / "config.json").read_text())
    return LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.context, rms_norm_eps=cfg.rms_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=True, bos_token_id=src.get("bos_token_id"),
        eos_token_id=src.get("eos_token_id"), pad_token_id=src.get("pad_token_id"), dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    ).to_dict()


def write_hf_folder(cfg: SynthConfig, out: Path, source: Path, shard_bytes: int) -> int:
    """bf16 safetensors shards + index + config + tokenizer; returns the weight bytes."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    specs = cfg.tensors()
    shards = list(_shard_plan(specs, shard_bytes))
    weight_map: dict[str, str] = {}
    total = 0
    for index, names in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        shapes = dict(specs)
        tensors = {name: make_tensor(cfg, name, shapes[name]) for name in names}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config(cfg, source), indent=2))
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    return total


def _shard_plan(specs: Sequence[tuple[str, tuple[int, ...]]], shard_bytes: int) -> Iterator[list[str]]:
    shard: list[str] = []
    size = 0
    for name, shape in specs:
        nbytes = 2 * int(np.prod(shape))
        if shard and size + nbytes > shard_bytes:
            yield shard
            shard, size = [], 0
        shard.append(name)
        size += nbytes
    if shard:
        yield shard


# ----------------------------------------------------------------------------------------- GGUF
def permute_llama(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute: rotary halves -> interleaved pairs, per head."""
    # w [heads * head_dim, in] -> [heads, 2, head_dim/2, in] -> swap -> [heads, head_dim/2, 2, in]
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor(cfg: SynthConfig, hf_name: str, w: np.ndarray) -> np.ndarray:
    """The float32 tensor as llama.cpp stores it (q/k permuted)."""
    if hf_name.endswith("q_proj.weight"):
        return permute_llama(w, cfg.heads)
    if hf_name.endswith("k_proj.weight"):
        return permute_llama(w, cfg.kv_heads)
    return w


def quantize_rows(w: np.ndarray, qtype) -> np.ndarray:
    """gguf.quants.quantize a chunk of rows at a time: uint8 [rows, bytes per row]."""
    from gguf.quants import quantize

    return np.concatenate([quantize(w[r:r + QUANT_CHUNK_ROWS], qtype) for r in range(0, w.shape[0], QUANT_CHUNK_ROWS)])


def tensor_qtype(hf_name: str, shape: tuple[int, ...], file_qtype: str):
    from gguf import GGMLQuantizationType

    if len(shape) == 1:
        return GGMLQuantizationType.F32
    qtype = EMBED_QTYPE if hf_name == "model.embed_tokens.weight" else file_qtype
    return GGMLQuantizationType[qtype.upper()]


def tensor_nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf.quants import quant_shape_to_byte_shape

    return int(np.prod(quant_shape_to_byte_shape(shape, qtype)))


def tokenizer_metadata(source_gguf: Path) -> list[tuple[str, Any, Any, Any]]:
    """Every ``tokenizer.*`` key of the bundled SmolLM2 GGUF: (key, value, type, array item type). Read once (the
    reader parses every one of its 49152 tokens: ~4 s)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(source_gguf)
    return [(key, field.contents(), field.types[0], field.types[1] if field.types[0] == GGUFValueType.ARRAY else None)
            for key, field in reader.fields.items() if key.startswith("tokenizer.")]


def llama_metadata(writer, cfg: SynthConfig, file_qtype: str) -> None:
    from gguf import LlamaFileType

    writer.add_name(f"synthetic-llama-{file_qtype}")
    writer.add_block_count(cfg.layers)
    writer.add_context_length(cfg.context)
    writer.add_embedding_length(cfg.hidden)
    writer.add_feed_forward_length(cfg.intermediate)
    writer.add_head_count(cfg.heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_vocab_size(cfg.vocab)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_file_type(LlamaFileType[f"MOSTLY_{file_qtype.upper()}"])
    writer.add_quantization_version(2)


def write_ggufs(cfg: SynthConfig, hf: Path, paths: dict[str, Path], source_gguf: Path) -> None:
    """One pass over the safetensors folder, each tensor read once and written to every GGUF."""
    from gguf import GGMLQuantizationType, GGUFWriter, MODEL_ARCH, get_tensor_name_map
    from safetensors import safe_open

    names = get_tensor_name_map(MODEL_ARCH.LLAMA, cfg.layers)
    specs = cfg.tensors()
    writers = {q: GGUFWriter(path, "llama") for q, path in paths.items()}
    tokenizer = tokenizer_metadata(source_gguf)
    for qtype, writer in writers.items():
        llama_metadata(writer, cfg, qtype)
        for key, value, vtype, sub in tokenizer:
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for hf_name, shape in specs:
            raw = tensor_qtype(hf_name, shape, qtype)
            writer.add_tensor_info(names.get_name(hf_name, try_suffixes=(".weight",)), shape, np.dtype(np.float32),
                                   tensor_nbytes(shape, raw), raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    shapes = dict(specs)
    try:
        for file in dict.fromkeys(index[name] for name, _ in specs):  # shards in tensor order
            with safe_open(str(hf / file), framework="pt") as f:  # one shard's pages mapped at a time
                for hf_name in (name for name, _ in specs if index[name] == file):
                    w = gguf_tensor(cfg, hf_name, f.get_tensor(hf_name).float().numpy())
                    for qtype, writer in writers.items():
                        raw = tensor_qtype(hf_name, shapes[hf_name], qtype)
                        writer.write_tensor_data(w if raw == GGMLQuantizationType.F32 else quantize_rows(w, raw))
                    del w
    finally:
        for writer in writers.values():
            writer.close()


# ------------------------------------------------------------------------------------------ main
def smollm2_sources() -> tuple[Path, Path]:
    """(SmolLM2's dense folder for the tokenizer files, the bundled GGUF for the tokenizer metadata)."""
    from parallax.broker.model import resolve_model, smollm2_gguf

    try:
        folder = resolve_model("smollm2-135m", dequantize=True).path  # once GGUF folders hold no safetensors
    except TypeError:
        folder = resolve_model("smollm2-135m").path
    return Path(folder), smollm2_gguf()


def synthesize(cfg: SynthConfig, out: Path, gguf_types: Sequence[str] = GGUF_TYPES, shard_mb: int = 512) -> dict:
    """Writes ``out/hf`` and ``out/synth-<type>.gguf``; returns what was written (sizes and seconds)."""
    for qtype in gguf_types:
        if qtype not in GGUF_TYPES:
            raise ValueError(f"GGUF type {qtype!r} not one of {GGUF_TYPES}")
    folder, source_gguf = smollm2_sources()
    out.mkdir(parents=True, exist_ok=True)
    hf = out / "hf"
    say(f"{cfg.parameters() / 1e9:.3f}B parameters -> {hf} (bf16 safetensors)")
    started = time.perf_counter()
    hf_bytes = write_hf_folder(cfg, hf, folder, shard_mb * 1024 * 1024)
    summary = {"config": asdict(cfg), "parameters": cfg.parameters(),
               "hf": {"path": str(hf), "bytes": hf_bytes, "seconds": time.perf_counter() - started}}
    say(f"  {hf_bytes / 1e9:.2f} GB in {summary['hf']['seconds']:.0f} s")
    paths = {q: out / f"synth-{q}.gguf" for q in gguf_types}
    if paths:
        say("GGUF " + ", ".join(str(p) for p in paths.values()))
        started = time.perf_counter()
        write_ggufs(cfg, hf, paths, source_gguf)
        seconds = time.perf_counter() - started
        for qtype, path in paths.items():
            summary[qtype] = {"path": str(path), "bytes": path.stat().st_size, "seconds": seconds}
            say(f"  {path.name}: {path.stat().st_size / 1e9:.2f} GB")
        say(f"  both in {seconds:.0f} s")
    (out / "synth.json").write_text(json.dumps(summary, indent=2))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0, help="weights seed")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-64 model (for tests)")
    p.add_argument("--gguf", default=",".join(GGUF_TYPES), help="GGUF files to write, comma-separated ('' for none)")
    p.add_argument("--shard-mb", type=int, default=512, help="safetensors shard size")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    base = TINY if args.tiny else SynthConfig()
    cfg = SynthConfig(**{**asdict(base), "seed": args.seed})
    types = [t.strip().lower() for t in args.gguf.split(",") if t.strip()]
    try:
        summary = synthesize(cfg, args.out, types, args.shard_mb)
    except ValueError as exc:
        print(f"synth: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
