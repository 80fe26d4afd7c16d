"""Quantized weights through the stage model: ``--quantize {q8_0,q4_0}`` on an HF checkpoint (and a
GGUF source) holds every matrix as its blocks; float32 activations then compute exactly what
transformers computes in float32 on the dequantized weights, split over any number of stages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from parallax.broker.connection import NatsOptions
from parallax.broker.errors import UsageError
from parallax.broker.layers import even_split
from parallax.stages.kv import KVPool, Rows
from parallax.stages.quant import QuantMatrix
from parallax.stages.torch_backend import TorchBackend, load_stage_model
from tests.cluster import RowSteps, make_tiny_model

CPU = torch.device("cpu")
QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
LAYERS = 6
NEW_TOKENS = 32
PROMPTS = [[1, 17, 250, 3, 99], [5] * 3 + list(range(40, 57)), [311]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-models")
    return {
        "llama": make_tiny_model(root / "llama", "llama", layers=LAYERS),
        "tied": make_tiny_model(root / "tied", "llama", layers=LAYERS, tied=True),
        "qwen2": make_tiny_model(root / "qwen2", "qwen2", layers=LAYERS),
        "qwen3": make_tiny_model(root / "qwen3", "qwen3", layers=LAYERS),
    }


def load(path: Path, start: int, end: int, quantize: str | None, dtype=torch.float32):
    return load_stage_model(path, json.loads((path / "config.json").read_text()), start, end, dtype, CPU, quantize)


def dequantized_reference(path: Path, qtype: gguf.GGMLQuantizationType):
    """transformers in float32 with every matrix replaced by gguf's dequantization of its quantization."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():  # a tied embedding/head is one parameter: done once
            if p.dim() == 2:
                blocks = gguf.quants.quantize(p.numpy(), qtype)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, qtype)))
    return model


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    ids, past, tokens, logits = torch.tensor([prompt]), None, [], []
    for _ in range(new_tokens):
        out = model(ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits[0, -1])
        tokens.append(int(logits[-1].argmax()))
        ids = torch.tensor([[tokens[-1]]])
    return tokens, torch.stack(logits)


@torch.inference_mode()
def stage_greedy(stages, prompt: list[int], new_tokens: int, dtype: torch.dtype = torch.float32
                 ) -> tuple[list[int], torch.Tensor]:
    """The prompt in one chunk, then one token a step, through every stage in turn (blocks in any order)."""
    pools = [KVPool(len(s.layers), s.args.kv_heads, s.args.dim_head, 20, 4, dtype, CPU) for s in stages]
    table = [7, 3, 19, 0, 12, 5, 1, 18, 9, 2, 14, 4, 16, 6, 11, 8, 13, 10, 15, 17]  # 80 positions
    x, pos, tokens, logits = torch.tensor(prompt), 0, [], []
    for _ in range(new_tokens):
        rows = Rows.build([(table, pos, len(x), True)], 4, CPU, prompt=len(x) > 1)
        h = x
        for stage, pool in zip(stages, pools):
            h = stage(h, rows, pool)
        logits.append(h[-1])
        tokens.append(int(h[-1].float().argmax()))
        pos, x = pos + len(x), torch.tensor([tokens[-1]])
    return tokens, torch.stack(logits)


@pytest.mark.parametrize("name, quantize", [("llama", "q8_0"), ("llama", "q4_0"), ("tied", "q4_0"), ("qwen2", "q4_0"),
                                            ("qwen3", "q4_0")])  # each architecture once; q8_0 on llama (suite time)
def test_float32_split_equals_transformers_on_the_dequantized_model(models, name, quantize):
    path = models[name]
    reference = dequantized_reference(path, QTYPES[quantize])
    splits = {n: [load(path, a, b, quantize) for a, b in even_split(LAYERS, n)] for n in (2, 3)}
    for stages in splits.values():
        assert all(isinstance(layer.mlp.down_proj.weight, QuantMatrix) for s in stages for layer in s.layers)
    for prompt in PROMPTS:
        want, want_logits = reference_greedy(reference, prompt, NEW_TOKENS)
        for n, stages in splits.items():
            got, got_logits = stage_greedy(stages, prompt, NEW_TOKENS)
            assert got == want, f"{n} stages, prompt {prompt}"
            assert (got_logits - want_logits).abs().max() <= 1e-4 * max(1.0, float(want_logits.abs().max()))


def test_quantization_changes_the_model(models):
    """The reference above is the quantized model, not the original: the two differ."""
    path = models["llama"]
    stages = [load(path, 0, LAYERS, "q4_0")]
    plain = [load(path, 0, LAYERS, None)]
    _, quantized = stage_greedy(stages, PROMPTS[0], 2)
    _, dense = stage_greedy(plain, PROMPTS[0], 2)
    assert (quantized - dense).abs().max() > 1e-3


def expected_bytes(path: Path, start: int, end: int, qtype: gguf.GGMLQuantizationType, act_size: int) -> int:
    """Bytes a stage holds, from the checkpoint's shapes: matrices as blocks (their biases float32), norms in
    the activation dtype."""
    from safetensors import safe_open

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    config = json.loads((path / "config.json").read_text())
    first, last = start == 0, end == config["num_hidden_layers"]
    total = 0
    with safe_open(path / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
        if last and "lm_head.weight" not in names and not first:
            names.append("lm_head.weight")  # tied: the last stage holds the embedding's table as its head
        for name in names:
            shape = f.get_slice(name if name in f.keys() else "model.embed_tokens.weight").get_shape()
            if name.startswith("model.layers."):
                if not start <= int(name.split(".")[2]) < end:
                    continue
            elif (name == "model.embed_tokens.weight" and not first) or (name != "model.embed_tokens.weight" and not last):
                continue
            if len(shape) == 2:
                total += shape[0] * shape[1] // block * size
            else:  # a bias of a quantized matrix is float32 inside it; norms in the activation dtype
                total += shape[0] * (4 if name.endswith(".bias") else act_size)
    return total


def int4_growth(stage) -> int:
    """Bytes a stage's Q4_0 matrices held in torch's int4 layout take beyond their blocks: 2 per 32 weights."""
    from parallax.stages.kernels import projections, tiled

    repacked = [m for m in tiled(projections(stage)) if isinstance(m, QuantMatrix) and m.repacked
                and m.candidates("decode", torch.bfloat16) == ("int4pack",)]  # the int8 tiles take the blocks' bytes
    return sum(m.shape[0] * m.shape[1] // 16 for m in repacked if m.qtype == gguf.GGMLQuantizationType.Q4_0)


@pytest.mark.parametrize("quantize", list(QTYPES))
@pytest.mark.parametrize("name,split", [("llama", (0, 6)), ("llama", (2, 4)), ("qwen2", (3, 6)), ("tied", (0, 6)),
                                        ("tied", (4, 6))])
def test_a_stage_holds_its_blocks_once(models, name, quantize, split):
    stage = load(models[name], *split, quantize, torch.bfloat16)
    assert stage.weight_bytes == expected_bytes(models[name], *split, QTYPES[quantize], 2) + int4_growth(stage)
    if stage.first and stage.last and stage.args.tie_word_embeddings:
        assert stage.embed_tokens.weight is stage.lm_head.weight
        assert isinstance(stage.lm_head.weight, QuantMatrix)


@pytest.mark.parametrize("quantize", [None, *QTYPES])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_stage_holds_what_its_profile_says(models, quantize, dtype):
    from parallax.stages.profile import model_profile

    path = models["llama"]
    profile = model_profile(path, dtype, quantize=quantize)
    dt = getattr(torch, dtype)
    for a, b in [(0, 2), (2, 4), (4, 6)]:
        stage = load(path, a, b, quantize, dt)
        want = (b - a) * profile.layer_bytes + stage.first * profile.first_bytes + stage.last * profile.last_bytes
        if quantize == "q4_0" and dtype == "bfloat16":  # the profile counts the int4 layout a stage may pick
            assert stage.weight_bytes <= want  # exactly what it holds: test_a_stage_holds_its_blocks_once
        else:
            assert stage.weight_bytes == want


def test_quantize_needs_in_features_in_whole_blocks(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", num_hidden_layers=1, vocab_size=64, hidden_size=48, intermediate_size=96,
                                  num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "odd")
    with pytest.raises(UsageError, match=r"--quantize q8_0: .*\[64, 48\].* not a multiple of the Q8_0 block size 32"):
        load(tmp_path / "odd", 0, 1, "q8_0")
    with pytest.raises(UsageError, match="choose one of q8_0, q4_0"):
        load(tmp_path / "odd", 0, 1, "q5_0")


# --- bf16 activations: the fused path over quantized projections -----------------------------------


@pytest.mark.parametrize("quantize", list(QTYPES))
def test_bf16_rows_do_not_depend_on_the_batch(models, quantize):
    """Request A's hidden states (bits) alone equal them beside other prompts and 20 generated tokens, in
    chunks; its generated token's row alone equals it among 20 others."""
    from parallax.stages.backend import StepItem

    backend = TorchBackend.load(models["llama"], "tiny", 0, 3, "bfloat16", "cpu", quantize=quantize)
    assert backend.model.fused and isinstance(backend.model.layers[0].self_attn.qkv_proj.weight, QuantMatrix)
    backend.init_kv(23 * 12, 4)
    rng = np.random.default_rng(0)
    prompts = {"a": rng.integers(1, 512, 40), "b": rng.integers(1, 512, 37)}
    prompts |= {f"d{i}": rng.integers(1, 512, 5) for i in range(20)}
    steps = RowSteps(backend, prompts)
    item, hidden = steps.item, steps.hidden

    alone = hidden([item("a", 0, 40)])["a"]
    hidden([item(f"d{i}", 0, 5) for i in range(20)])
    decoders = [item(f"d{i}", 5, 1, token=7 + i) for i in reversed(range(20))]
    assert np.array_equal(hidden(decoders + [item("b", 0, 37), item("a", 0, 40)])["a"], alone)
    chunks = [hidden([item("a", 0, 1)])["a"], hidden([item("a", 1, 16)])["a"], hidden([item("a", 17, 23)])["a"]]
    assert np.array_equal(np.concatenate(chunks), alone)
    token_alone = hidden([item("a", 40, 1, token=11)])["a"]
    decoders = [item(f"d{i}", 6, 1, token=9 + i) for i in range(20)]
    assert np.array_equal(hidden(decoders[:9] + [item("a", 40, 1, token=11)] + decoders[9:])["a"], token_alone)


def test_bf16_quantized_split_equals_one_stage(models):
    """bf16 through the fused path: a 2-stage split gives the 1-stage greedy tokens, bit for bit logits."""
    whole = [load(models["llama"], 0, LAYERS, "q4_0", torch.bfloat16)]
    split = [load(models["llama"], a, b, "q4_0", torch.bfloat16) for a, b in even_split(LAYERS, 2)]
    assert all(s.fused for s in whole + split)
    one, one_logits = stage_greedy(whole, PROMPTS[1], 8, torch.bfloat16)
    two, two_logits = stage_greedy(split, PROMPTS[1], 8, torch.bfloat16)
    assert one == two and torch.equal(one_logits, two_logits)


# --- a GGUF source (quantized blocks read from the file) ------------------------------------------


def write_gguf(hf: Path, out: Path, qtype: gguf.GGMLQuantizationType) -> Path:
    """The tiny HF llama as a llama.cpp-style GGUF: llama.cpp names, q/k rows permuted as its converter
    does, every matrix quantized to ``qtype``, vectors F32. Next to it a folder as broker.model resolves
    a GGUF to: config.json + ``model.gguf`` (a symlink)."""
    from safetensors.torch import load_file

    config = json.loads((hf / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors = load_file(hf / "model.safetensors")
    writer = gguf.GGUFWriter(out / "tiny.gguf", "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in tensors.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            target = f"blk.{i}.{parts[module]}.weight"
            n = heads if module == "self_attn.q_proj" else kv_heads if module == "self_attn.k_proj" else 0
            if n:  # llama.cpp's permute: the two halves of each head's rows interleaved
                t = t.reshape(n, 2, t.shape[0] // n // 2, t.shape[1]).swapaxes(1, 2).reshape(t.shape)
        else:
            target = names[name]
        a = t.float().numpy()
        if a.ndim == 2:
            writer.add_tensor(target, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(target, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    folder = out / "resolved"
    folder.mkdir()
    (folder / "config.json").write_text((hf / "config.json").read_text())
    os.symlink(out / "tiny.gguf", folder / "model.gguf")
    return folder


@pytest.mark.parametrize("quantize", list(QTYPES))
def test_a_gguf_source_serves_its_own_blocks(models, tmp_path, quantize):
    from parallax.broker.model import gguf_file

    folder = write_gguf(models["llama"], tmp_path, QTYPES[quantize])
    assert gguf_file(folder) is not None
    reference = dequantized_reference(models["llama"], QTYPES[quantize])
    stages = [load(folder, a, b, None) for a, b in even_split(LAYERS, 2)]
    assert isinstance(stages[0].embed_tokens.weight, QuantMatrix)
    for prompt in PROMPTS[:2]:
        want, want_logits = reference_greedy(reference, prompt, NEW_TOKENS)
        got, got_logits = stage_greedy(stages, prompt, NEW_TOKENS)
        assert got == want
        assert (got_logits - want_logits).abs().max() <= 1e-4 * max(1.0, float(want_logits.abs().max()))
    with pytest.raises(UsageError, match="already quantized"):
        load(folder, 0, 2, "q8_0")


def test_a_first_stage_reads_its_embedding_rows_from_the_stored_blocks(models, tmp_path):
    """An embedding is looked up, never multiplied: no kernel is measured for it and its blocks stay as stored
    (a repacked layout would be unpacked for every row read)."""
    from parallax.stages import kernels

    folder = write_gguf(models["llama"], tmp_path, QTYPES["q8_0"])
    stage = load(folder, 0, 3, None, torch.bfloat16)
    table = stage.embed_tokens.weight
    assert isinstance(table, QuantMatrix) and not table.repacked
    assert all(p is not table for p in kernels.tiled(kernels.projections(stage)))


# --- the command lines ------------------------------------------------------------------------------


def test_stage_cli_takes_quantize_and_dequantize():
    from parallax.stages.cli import parse_args

    args = parse_args(["--model", "m", "--quantize", "q4_0", "--dequantize"])
    assert args.quantize == "q4_0" and args.dequantize
    plain = parse_args(["--model", "m"])
    assert plain.quantize is None and not plain.dequantize
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--quantize", "q4_k"])


def test_up_passes_quantize_and_dequantize_to_every_stage():
    import parallax.cli as cli

    args = cli.build_parser().parse_args(["up", "--quantize", "q8_0", "--dequantize", "--stage-args", "--threads 1"])
    assert args.quantize == "q8_0" and args.dequantize
    plan = cli.UpPlan("m", "m", [(0, 1), (1, 2)], "float32", "127.0.0.1", 8000, ("--threads", "1"), "q8_0", True)
    command = cli.stage_command(plan, 1, 2, NatsOptions("nats://x"))
    assert command[command.index("--quantize") + 1] == "q8_0" and "--dequantize" in command
    assert command[-2:] == ["--threads", "1"]
    assert "--quantize" not in cli.gateway_command(plan, NatsOptions("nats://x"))  # the gateway reads config + tokenizer only
    bare = cli.stage_command(cli.UpPlan("m", "m", [(0, 2)], "float32", "127.0.0.1", 8000), 0, 2, NatsOptions("nats://x"))
    assert "--quantize" not in bare and "--dequantize" not in bare


def test_up_refuses_quantize_for_a_gguf_model(models, tmp_path):
    import parallax.cli as cli

    folder = write_gguf(models["llama"], tmp_path, QTYPES["q8_0"])
    args = cli.build_parser().parse_args(["up", "--model", str(folder), "--quantize", "q4_0"])
    with pytest.raises(UsageError, match="already quantized"):
        cli.plan_up(args)


@pytest.mark.slow
def test_up_serves_a_quantized_pipeline(tiny_model_dir, tmp_path):
    """`parallax up --quantize q8_0 --stages 2`: both stages hold q8_0 blocks and the pipeline serves the
    greedy tokens of transformers float32 on the dequantized weights."""
    import signal
    import subprocess
    import sys
    import time

    import httpx
    from transformers import AutoTokenizer

    from parallax.broker.server import free_port

    port, log_path = free_port(), tmp_path / "up.log"
    with open(log_path, "w") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "parallax.cli", "up", "--model", str(tiny_model_dir), "--stages", "2", "--quantize",
             "q8_0", "--port", str(port), "--nats-port", str(free_port()), "--dtype", "float32"],
            stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 240
            while not _healthy(base):
                assert up.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.5)
            reply = httpx.post(f"{base}/v1/completions", timeout=120, json={
                "model": tiny_model_dir.name, "prompt": "Hello there", "max_tokens": 8, "temperature": 0,
                "ignore_eos": True})
            assert reply.status_code == 200, reply.text
            up.send_signal(signal.SIGINT)
            assert up.wait(30) == 0
        finally:
            if up.poll() is None:
                up.kill()
                up.wait(10)
    text = log_path.read_text()
    assert text.count("q8_0 weights") == 2, text[-3000:]  # each stage's load line
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok.encode("Hello there")
    want, _ = reference_greedy(dequantized_reference(tiny_model_dir, QTYPES["q8_0"]), prompt, 8)
    assert reply.json()["choices"][0]["text"] == tok.decode(want)


def _healthy(base: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_stage_refuses_quantize_for_a_gguf_model_in_one_line(models, tmp_path):
    import subprocess
    import sys

    folder = write_gguf(models["llama"], tmp_path, QTYPES["q4_0"])
    done = subprocess.run([sys.executable, "-m", "parallax.stages.cli", "--model", str(folder), "--layers", "0:2",
                           "--quantize", "q8_0", "--nats", "nats://127.0.0.1:1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "tiny.gguf is already quantized" in done.stderr and "Traceback" not in done.stderr


def test_a_loaded_stage_reports_its_kernel_picks_in_its_registry_record(models, tmp_path, monkeypatch):
    """What the tuning picked reaches the backend and the stage's NodeInfo (``parallax status`` shows it)."""
    from parallax.broker.registry import NodeInfo
    from parallax.stages.worker import NodeFacts, node_info

    monkeypatch.setenv("PARALLAX_CACHE", str(tmp_path))
    backend = TorchBackend.load(models["llama"], "tiny", 0, 3, "bfloat16", "cpu", quantize="q4_0")
    kinds = {key.rsplit(" ", 1)[1] for key in backend.kernels}
    assert kinds == {"decode", "prefill"} and any(" Q4_0 " in key for key in backend.kernels)
    assert set(backend.kernels.values()) <= {"numba", "numba-gemv", "torch-tile", "torch", "int4pack", "int8"}
    info = node_info("n1", "tiny", 3, "cpu", "bfloat16", NodeFacts(), "serving", (0, 3), kernels=backend.kernels)
    assert NodeInfo.model_validate_json(info.model_dump_json()).kernels == backend.kernels


def test_float32_activations_over_quantized_weights_run_the_fused_float32_layer(models):
    """The exactness runs above go through ``kernels.fused_layer`` in float32 mode (float32 KV cache)."""
    from parallax.stages import kernels

    backend = TorchBackend.load(models["llama"], "tiny", 0, 3, "float32", "cpu", quantize="q8_0")
    assert backend.model.fused and backend.model.decode_group == kernels.MAX_ROWS
    backend.init_kv(8, 4)
    assert all(a.dtype == np.float32 for a in backend.kv.bits())


def test_a_quantized_stage_compiles_its_fused_layer_while_it_loads(models):
    """``StageModel.warm_up``: the first layer ran each row kind at load (its int8 operands are looked up then), so
    the first prompt and the first generated token compile no numba kernel (~4 s a stage on a cold cache)."""
    stage = load(models["llama"], 0, LAYERS, "q4_0", torch.bfloat16)
    assert set(stage.layers[0].weights().int8) == {"decode", "prefill"}
    compiled = numba_overloads()
    stage_greedy([stage], PROMPTS[1], 2, torch.bfloat16)
    assert numba_overloads() == compiled


def numba_overloads() -> dict[str, int]:
    """Compiled signatures of every numba kernel of the stage modules."""
    from numba.core.registry import CPUDispatcher

    from parallax.stages import int8dot, kernels, quant

    return {f"{m.__name__}.{name}": len(f.overloads) for m in (kernels, quant, int8dot)
            for name, f in vars(m).items() if isinstance(f, CPUDispatcher)}
