"""gpt-oss and sliding-window attention on tiny random configs: float32 logits and greedy tokens equal
transformers' through 1-, 2- and 3-stage splits (layers alternating sliding and full attention, a window
shorter than the prompt), attention sinks and windows change the logits, MXFP4 experts kept as stored equal
their exact dequantization, batched decode of requests at different lengths equals each alone, the profile
counts what a stage holds, Mistral's, Qwen2's and Mixtral's windows equal transformers', and a gpt-oss chat
template renders."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from parallax.broker.errors import UnsupportedModel
from parallax.stages.kv import KVPool, Rows
from parallax.stages.models import architecture
from parallax.stages.models.gpt_oss import Expert, GptOssMoE, SinkAttention
from parallax.stages.mxfp4 import MXFP4Matrix
from parallax.stages.torch_backend import load_stage_model
from tests.cluster import reference_greedy
from tests.test_moe import assert_as_close_as_transformers_to_itself, greedy_through, pools, reference_logits, run_stages

CPU = torch.device("cpu")
VOCAB, WINDOW = 512, 5  # prompts of 16 and more: longer than the window, which spans two blocks of 4
GPT_OSS = dict(num_hidden_layers=4, vocab_size=VOCAB, hidden_size=64, intermediate_size=32, head_dim=16,
               num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
               sliding_window=WINDOW, initializer_range=0.3, max_position_embeddings=4096)
SPLITS = [[(0, 4)], [(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]]
MXFP4 = gguf.GGMLQuantizationType.MXFP4


def make_gpt_oss(path: Path) -> Path:
    """A random gpt-oss (sliding, full, sliding, full) in float32; routers scaled up (no near-ties in the top k),
    sinks and expert biases random (not transformers' zeros)."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GptOssConfig(**GPT_OSS), dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.weight.mul_(4)
            layer.self_attn.sinks.normal_(0, 1)
            layer.mlp.experts.gate_up_proj_bias.normal_(0, 0.3)
            layer.mlp.experts.down_proj_bias.normal_(0, 0.3)
    model.save_pretrained(path)
    return path


def quantize_experts(source: Path, mxfp4: Path, dequantized: Path) -> None:
    """``source``'s experts as an MXFP4 checkpoint in Hugging Face's layout (``*_blocks`` [E, O, I/32, 16],
    ``*_scales`` [E, O, I/32], quantized by gguf and converted), and the same model with those experts
    dequantized exactly (gguf's dequantization), float32: transformers' reference."""
    tensors, exact = load_file(source / "model.safetensors"), {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        fused = tensors.pop(name)  # [E, I, O]: x @ W
        mats = [MXFP4Matrix.from_ggml(gguf.quants.quantize(w.T.contiguous().numpy(), MXFP4), tuple(w.T.shape))
                for w in fused]
        tensors[f"{name}_blocks"] = torch.stack([m.blocks for m in mats])
        tensors[f"{name}_scales"] = torch.stack([m.scales for m in mats])
        exact[name] = torch.stack([torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.T.contiguous().numpy(),
                                                                                                   MXFP4), MXFP4)).T
                                   for w in fused]).contiguous()
    config = json.loads((source / "config.json").read_text())
    for folder, weights, extra in [(mxfp4, tensors, {"quantization_config": {"quant_method": "mxfp4"}}),
                                   (dequantized, {**{k: v for k, v in tensors.items() if not k.endswith(("_blocks", "_scales"))},
                                                  **exact}, {})]:
        folder.mkdir()
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config | extra))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss")
    make_gpt_oss(root / "float")
    quantize_experts(root / "float", root / "mxfp4", root / "dequantized")
    return {name: root / name for name in ("float", "mxfp4", "dequantized")}


def load(path: Path, start: int, end: int, dtype=torch.float32, config: dict | None = None, quantize=None):
    config = config or json.loads((path / "config.json").read_text())
    return load_stage_model(path, config, start, end, dtype, CPU, quantize)


def logits(served, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Every position's logits: the prompt in one step, then one token a step."""
    caches = pools(served)
    return torch.cat([run_stages(served, caches, ids[:prompt], 0)]
                     + [run_stages(served, caches, ids[p : p + 1], p) for p in range(prompt, len(ids))])


def reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


IDS = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(1))


def test_layers_alternate_sliding_and_full_with_sinks_and_experts(folders):
    stage = load(folders["float"], 1, 4)  # global layers 1..3: full, sliding, full
    assert [layer.self_attn.window for layer in stage.layers] == [None, WINDOW, None]
    assert all(isinstance(layer.self_attn, SinkAttention) and isinstance(layer.mlp, GptOssMoE) for layer in stage.layers)
    assert not stage.fused


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_split_forward_matches_transformers(folders, stages):
    got = logits([load(folders["float"], a, b) for a, b in SPLITS[stages - 1]], IDS, 16)
    assert_as_close_as_transformers_to_itself(got, reference(folders["float"]), IDS, 16)


@pytest.mark.parametrize("split", [2, 3])
def test_greedy_tokens_match_transformers(folders, split):
    prompt, new = [3, 17, 250, 9, 77, 401, 12], 10  # 7 + 10 positions: the window slides
    want = reference_greedy(folders["float"], prompt, new)
    served = [load(folders["float"], a, b) for a, b in SPLITS[split - 1]]
    assert greedy_through(served, prompt, new) == want


def test_sinks_and_windows_change_the_logits(folders):
    """Neither is a no-op: other sinks, or a stage that attends to every key, give other logits."""
    stage = load(folders["float"], 0, 4)
    base = logits([stage], IDS, 16)
    for layer in stage.layers:
        layer.self_attn.sinks.data.add_(2.0)
    assert (logits([stage], IDS, 16) - base).abs().max() > 1e-2 * base.abs().max()
    stage = load(folders["float"], 0, 4)
    for layer in stage.layers:
        layer.self_attn.window = None
    unwindowed = logits([stage], IDS, 16)
    # within the window nothing changes (but rounding: the masked attention is other float32 ops) ...
    assert (unwindowed[:WINDOW] - base[:WINDOW]).abs().max() <= 1e-5 * base.abs().max()
    assert (unwindowed[WINDOW:] - base[WINDOW:]).abs().max() > 1e-2 * base.abs().max()  # ... beyond it, all does


def test_the_experts_use_gpt_oss_clamped_swiglu_and_interleaved_gate_up(folders):
    """One expert of the stage equals transformers' expert on the same rows (gate j in column 2j of the fused
    [D, 2I] tensor, up j in 2j + 1; clamp at swiglu_limit; biases)."""
    ref = reference(folders["float"]).model.layers[0].mlp.experts
    ours: Expert = load(folders["float"], 0, 1).layers[0].mlp.experts[3]
    x = torch.randn(5, 64) * 4  # large enough that some gate/up values pass the limit of 7
    with torch.no_grad():
        gate_up = x @ ref.gate_up_proj[3] + ref.gate_up_proj_bias[3]
        assert (gate_up.abs() > ref.limit).any()
        want = ref._apply_gate(gate_up) @ ref.down_proj[3] + ref.down_proj_bias[3]
        assert torch.allclose(ours(x), want, rtol=1e-5, atol=1e-5)


def test_mxfp4_experts_stay_mxfp4_and_equal_their_dequantization(folders):
    served = [load(folders["mxfp4"], a, b) for a, b in SPLITS[1]]
    expert = served[0].layers[0].mlp.experts[2]
    for linear, (O, I) in ((expert.gate_up_proj, (64, 64)), (expert.down_proj, (64, 32))):
        assert isinstance(linear.weight, MXFP4Matrix) and linear.weight.shape == (O, I)
        assert linear.weight.blocks.nbytes + linear.weight.scales.nbytes == O * I // 32 * 17  # 17 bytes per 32
    ref = reference(folders["dequantized"])
    stored = load_file(folders["float"] / "model.safetensors")["model.layers.0.mlp.experts.gate_up_proj"][2].T  # [O, I]
    exact = ref.model.layers[0].mlp.experts.gate_up_proj[2].T
    assert torch.equal(expert.gate_up_proj.weight.dequantize_rows(0, 64), exact)  # as gguf dequantizes
    assert not torch.equal(exact, stored)  # (quantized: not the float weights)
    assert_as_close_as_transformers_to_itself(logits(served, IDS, 16), ref, IDS, 16)


def test_transformers_reads_our_mxfp4_checkpoint_as_we_do(folders):
    """transformers itself dequantizes the MXFP4 folder (on CPU) to the same experts: the layout is its own."""
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(folders["mxfp4"], dtype=torch.float32)
    exact = reference(folders["dequantized"])
    for a, b in zip(theirs.model.layers, exact.model.layers):
        assert torch.equal(a.mlp.experts.gate_up_proj.float(), b.mlp.experts.gate_up_proj)
        assert torch.equal(a.mlp.experts.down_proj.float(), b.mlp.experts.down_proj)


def test_mxfp4_matrix_product_and_errors():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((70, 96)).astype(np.float32)
    m = MXFP4Matrix.from_ggml(gguf.quants.quantize(w, MXFP4), (70, 96), torch.randn(70))
    exact = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, MXFP4), MXFP4))
    assert torch.equal(m.dequantize_rows(0, 70), exact) and torch.equal(m.dequantize_rows(5, 9), exact[5:9])
    x = torch.randn(3, 96)
    assert torch.allclose(m.matmul(x), x @ exact.T + m.bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(m.dequantize_rows(0, 70, torch.bfloat16).float(), exact)  # exact in bf16 too
    assert np.allclose(m.decode(x.numpy()), m.matmul(x).numpy())
    with pytest.raises(ValueError, match=r"\[rows, 96\]"):
        m.matmul(torch.randn(3, 64))
    with pytest.raises(ValueError, match="uint8"):
        MXFP4Matrix(m.blocks.float(), m.scales)
    with pytest.raises(ValueError, match=r"\[O, I/32, 16\]"):
        MXFP4Matrix(m.blocks[:, :, :8], m.scales)


@pytest.mark.parametrize("quantize", [None, "q8_0"])
@pytest.mark.parametrize("name", ["float", "mxfp4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_stage_holds_what_its_profile_says(folders, name, dtype, quantize):
    """Per-layer bytes as held: fused float experts as E matrices (quantized one expert at a time with
    --quantize), MXFP4 blocks and scales as stored (--quantize leaves them), biases and sinks as vectors."""
    from parallax.stages.profile import model_profile

    profile = model_profile(folders[name], dtype, quantize=quantize)
    for a, b in SPLITS[2] + [(0, 4)]:
        stage = load(folders[name], a, b, getattr(torch, dtype), quantize=quantize)
        assert stage.weight_bytes == profile.range_bytes(a, b)
    if name == "mxfp4" and quantize is None:  # experts at 17 bytes per 32 weights, not as floats
        assert profile.layer_bytes < model_profile(folders["float"], dtype).layer_bytes / 2


def decode_together(served, prompts: dict[str, list[int]], steps: int) -> dict[str, torch.Tensor]:
    """Each prompt prefilled alone, then ``steps`` decode steps of all requests in one batch (their lengths
    differ): each request's logits of every decode step."""
    tables = {rid: [k * 8 + j for j in range(8)] for k, rid in enumerate(prompts)}  # 8 blocks of 4 each
    caches = [KVPool(len(s.layers), s.args.kv_heads, s.args.dim_head, 8 * len(prompts), 4, torch.float32, CPU)
              for s in served]
    tokens, out = {}, {rid: [] for rid in prompts}
    with torch.inference_mode():
        for rid, ids in prompts.items():
            x = torch.tensor(ids)
            for stage, pool in zip(served, caches):
                x = stage(x, Rows.build([(tables[rid], 0, len(ids), True)], 4, CPU), pool)
            tokens[rid] = int(x[-1].argmax())
        for step in range(steps):
            x = torch.tensor([tokens[rid] for rid in prompts])
            parts = [(tables[rid], len(ids) + step, 1, True) for rid, ids in prompts.items()]
            for stage, pool in zip(served, caches):
                x = stage(x, Rows.build(parts, 4, CPU), pool)
            for rid, row in zip(prompts, x):
                out[rid].append(row)
                tokens[rid] = int(row.argmax())
    return {rid: torch.stack(rows) for rid, rows in out.items()}


@pytest.mark.parametrize("model", ["gpt_oss", "mistral"])
def test_batched_decode_of_different_lengths_equals_each_alone(folders, mistral, model):
    """Rows at different lengths in one decode step: each sees its own window (blocks before the earliest
    window of the batch are not read; a later row's older keys are masked)."""
    path, split = (folders["float"], SPLITS[1]) if model == "gpt_oss" else (mistral, [(0, 1), (1, 3)])
    served = [load(path, a, b) for a, b in split]
    prompts = {"a": list(range(3, 22)), "b": [7, 8, 9], "c": list(range(40, 50))}
    together = decode_together(served, prompts, 6)
    for rid, ids in prompts.items():
        alone = decode_together(served, {rid: ids}, 6)[rid]
        # float32 rounding of batched products only (a row seeing other keys would differ by O(1))
        assert (together[rid] - alone).abs().max() <= 1e-4 * alone.abs().max()


# --- sliding windows of other architectures --------------------------------------------------------------


def make_windowed(path: Path, model_type: str, **extra) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, num_hidden_layers=3, vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                  initializer_range=0.3, sliding_window=WINDOW, **extra)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.mul_(4)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return make_windowed(tmp_path_factory.mktemp("mistral") / "m", "mistral")


@pytest.fixture(scope="module")
def windowed(tmp_path_factory, mistral):
    root = tmp_path_factory.mktemp("windowed")
    return {"mistral": mistral,
            # Qwen2: the layers from max_window_layers on slide
            "qwen2": make_windowed(root / "qwen2", "qwen2", use_sliding_window=True, max_window_layers=1),
            "mixtral": make_windowed(root / "mixtral", "mixtral", num_local_experts=4, num_experts_per_tok=2)}


WINDOWS = {"mistral": [WINDOW] * 3, "qwen2": [None, WINDOW, WINDOW], "mixtral": [WINDOW] * 3}


@pytest.mark.parametrize("name", list(WINDOWS))
def test_sliding_windows_match_transformers(windowed, name):
    path = windowed[name]
    assert [layer.self_attn.window for layer in load(path, 0, 3).layers] == WINDOWS[name]
    for split in ([(0, 3)], [(0, 1), (1, 3)]):
        got = logits([load(path, a, b) for a, b in split], IDS, 16)
        assert_as_close_as_transformers_to_itself(got, reference(path), IDS, 16)


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_the_fused_path_slides_too(windowed, name, tmp_path):
    """bf16 weights, float32 activations: the fused (numba) kernels attend to each row's last ``window`` keys,
    as transformers does on the widened weights (and attending to all of them would not)."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(windowed[name], dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    served = [load(tmp_path / "bf16", a, b) for a, b in [(0, 1), (1, 3)]]
    assert all(s.fused for s in served) and served[0].layers[0].self_attn.window == WINDOW
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).float().eval()
    ref = reference_logits(model, IDS, 16)
    assert (logits(served, IDS, 16) - ref).abs().max() <= 3e-5 * ref.abs().max()  # float32 sums in another order
    for stage in served:  # the same stages attending to every key: other logits past the window
        for layer in stage.layers:
            layer.self_attn.window = None
    unwindowed = logits(served, IDS, 16)
    assert (unwindowed[WINDOW:] - ref[WINDOW:]).abs().max() > 1e-2 * ref.abs().max()


def test_window_config_errors():
    base = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=8,
                vocab_size=16)
    args = architecture(base).ModelArgs
    assert args.from_dict(base | {"sliding_window": 8}).window(1) is None  # Qwen2: off without use_sliding_window
    with pytest.raises(UnsupportedModel, match="chunked_attention"):
        architecture(base | {"layer_types": ["full_attention", "chunked_attention"]})
    with pytest.raises(UnsupportedModel, match="3 layers"):
        args.from_dict(base | {"layer_types": ["full_attention"] * 3})
    with pytest.raises(UnsupportedModel, match="sliding_window"):
        args.from_dict(base | {"sliding_window": 0, "use_sliding_window": True})
    gpt = architecture({"model_type": "gpt_oss"}).ModelArgs
    with pytest.raises(UnsupportedModel, match="'bitsandbytes'"):
        gpt.from_dict(base | {"model_type": "gpt_oss", "num_local_experts": 4,
                              "quantization_config": {"quant_method": "bitsandbytes"}})


# --- the chat template ---------------------------------------------------------------------------------------

# The shape of gpt-oss's harmony template (the released one is longer): a system turn built with transformers'
# ``strftime_now``, the first system message moved to a developer turn, ``namespace`` state across the loop,
# ``raise_exception`` on bad input, assistant turns on the final channel, the assistant's turn opened.
HARMONY = """
{%- macro system_turn() -%}
<|start|>system<|message|>Knowledge cutoff: 2024-06
Current date: {{ strftime_now("%Y-%m-%d") }}

Reasoning: {{ reasoning_effort | default("medium") }}<|end|>
{%- endmacro -%}
{{- system_turn() -}}
{%- if messages[0].role in ("system", "developer") -%}
<|start|>developer<|message|># Instructions

{{ messages[0].content }}<|end|>
{%- set turns = messages[1:] -%}
{%- else -%}{%- set turns = messages -%}{%- endif -%}
{%- set state = namespace(users=0) -%}
{%- for message in turns -%}
{%- if message.role == "user" -%}{%- set state.users = state.users + 1 -%}
<|start|>user<|message|>{{ message.content }}<|end|>
{%- elif message.role == "assistant" -%}
<|start|>assistant<|channel|>final<|message|>{{ message.content }}<|end|>
{%- else -%}{{- raise_exception("unexpected role " + message.role) -}}{%- endif -%}
{%- endfor -%}
{%- if state.users == 0 -%}{{- raise_exception("no user message") -}}{%- endif -%}
{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"""


def test_a_gpt_oss_folders_chat_template_renders(tmp_path):
    """The gateway applies the model folder's template (tokenizer_config's chat_template, as ``gateway.app``
    calls it): a harmony one renders the conversation with its tags and the assistant's turn opened."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "Hi": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", chat_template=HARMONY)
    tok.save_pretrained(tmp_path)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(conversation, add_generation_prompt=True,
                                                                       tokenize=False)
    assert text == ("<|start|>system<|message|>Knowledge cutoff: 2024-06\nCurrent date: "
                    f"{datetime.date.today():%Y-%m-%d}\n\nReasoning: medium<|end|>"
                    "<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>"
                    "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Hello.<|end|>"
                    "<|start|>user<|message|>Bye<|end|><|start|>assistant")


# --- CUDA (skipped without a GPU) ---------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False")
def test_mxfp4_experts_on_cuda_stay_mxfp4_and_equal_the_cpu_stage(folders):
    """On a GPU the MXFP4 experts are held as stored (blocks and scales on the device), decoded a tile at a time;
    float32 logits (TF32 off) equal the CPU stage's."""
    gpu = torch.device("cuda")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        config = json.loads((folders["mxfp4"] / "config.json").read_text())
        stage = load_stage_model(folders["mxfp4"], config, 0, 4, torch.float32, gpu)
        weight = stage.layers[1].mlp.experts[0].down_proj.weight
        assert isinstance(weight, MXFP4Matrix) and weight.blocks.device.type == "cuda"
        pool = KVPool(4, stage.args.kv_heads, stage.args.dim_head, 8, 4, torch.float32, gpu)
        table, out = [5, 2, 7, 0, 3, 1], []
        with torch.inference_mode():
            rows = Rows.build([(table, 0, 16, True)], 4, gpu)
            rows.sample_rows = torch.arange(16, device=gpu)
            out.append(stage(IDS[:16].to(gpu), rows, pool))
            for p in range(16, 24):
                out.append(stage(IDS[p : p + 1].to(gpu), Rows.build([(table, p, 1, True)], 4, gpu), pool))
        got = torch.cat(out).cpu()
        want = logits([load(folders["mxfp4"], 0, 4)], IDS, 16)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
