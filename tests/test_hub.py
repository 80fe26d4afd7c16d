"""Models from the Hub, without the internet: a made-up Hub (tests/hub_mirror.py) on a loopback port,
reached through HF_ENDPOINT, serving tiny models in the Hub's layout. The mirror logs every request,
so the tests see which files each process fetched."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import nats
import pytest

from parallax.broker.connection import NatsOptions
from parallax.broker import hub
from parallax.broker.errors import GatedModel, HubUnreachable, ModelNotFound, UnsupportedModel, UsageError
from parallax.broker.model import fetch_layers, resolve_model
from tests.hub_mirror import Mirror, Repo

SHARDED, SINGLE, GATED, ODD = "acme/tiny-sharded", "acme/tiny-single", "acme/tiny-gated", "acme/odd-arch"
TOKEN = "hf_test_token_with_access"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GATEWAY_FILES = {"config.json", "generation_config.json", *TOKENIZER_FILES}


def add_dummy_tokenizer(folder: Path) -> None:
    """Files in the places a tokenizer has them (resolving does not read them), each its own content
    (the HF cache keeps one blob per content: equal files would come once)."""
    for name in TOKENIZER_FILES:
        (folder / name).write_text(json.dumps({"file": name}))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A 6-layer random Llama saved in 8 shards with an index, the same in one model.safetensors, and
    a config of an architecture no stage serves."""
    from transformers import AutoModelForCausalLM

    from tests.cluster import make_tiny_model

    root = tmp_path_factory.mktemp("hub-models")
    single = make_tiny_model(root / "single")
    add_dummy_tokenizer(single)
    sharded = root / "sharded"
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="150KB")
    add_dummy_tokenizer(sharded)
    assert len(set(json.loads((sharded / hub.INDEX).read_text())["weight_map"].values())) > 4
    odd = root / "odd"
    shutil.copytree(sharded, odd)
    (odd / "config.json").write_text(json.dumps({**json.loads((sharded / "config.json").read_text()),
                                                 "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return {"sharded": sharded, "single": single, "odd": odd}


@pytest.fixture
def mirror(models, tmp_path, monkeypatch):
    """The mirror running, HF_ENDPOINT pointing at it and an empty HF cache (for this process and the
    processes a test starts)."""
    import huggingface_hub.constants as hf_constants

    server = Mirror({SHARDED: Repo(models["sharded"], tags=("main", "v1")), SINGLE: Repo(models["single"]),
                     GATED: Repo(models["sharded"], token=TOKEN), ODD: Repo(models["odd"])}).start()
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))  # read at import: set it for this process too
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    try:
        yield server
    finally:
        server.stop()


def shards_with(folder: Path, prefixes: tuple[str, ...]) -> set[str]:
    """The shards holding a tensor whose name starts with one of ``prefixes`` (read from the index)."""
    weight_map = json.loads((folder / hub.INDEX).read_text())["weight_map"]
    return {file for name, file in weight_map.items() if name.startswith(prefixes)}


def one_line(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text and text, text
    return text


# ----------------------------------------------------------------------------- what each process fetches


def test_a_stage_of_layers_0_2_fetches_only_its_shards(mirror, models):
    from parallax.stages.models import architecture
    from parallax.stages.profile import model_profile
    from parallax.stages.torch_backend import TorchBackend

    source = resolve_model(SHARDED, need="headers", check=architecture)
    every_shard = set(json.loads((models["sharded"] / hub.INDEX).read_text())["weight_map"].values())
    assert mirror.downloaded(SHARDED) == {*GATEWAY_FILES, hub.INDEX}  # no weights yet
    assert mirror.header_reads(SHARDED) == every_shard  # only the headers, for the profile
    assert model_profile(source.path, "float32") == model_profile(models["sharded"], "float32")

    seen: list[float] = []
    fetch_layers(source, 0, 2, seen.append)
    wanted = shards_with(models["sharded"], ("model.layers.0.", "model.layers.1.", "model.embed_tokens."))
    assert mirror.downloaded(SHARDED) - GATEWAY_FILES - {hub.INDEX} == wanted
    assert wanted < every_shard and not shards_with(models["sharded"], ("lm_head.", "model.norm.")) & wanted
    assert seen == sorted(seen) and seen[-1] == 1.0 and any(0 < f < 1 for f in seen)  # the bytes, as they came

    backend = TorchBackend.load(source.path, source.name, 0, 2, "float32", "cpu")  # loads from those shards
    assert backend.spec.first and not backend.spec.last


def test_the_last_stage_fetches_norm_head_and_nothing_of_the_first_layers(mirror, models):
    source = resolve_model(SHARDED, need="headers")
    fetch_layers(source, 4, 6)
    got = mirror.downloaded(SHARDED) - GATEWAY_FILES - {hub.INDEX}
    assert got == shards_with(models["sharded"], ("model.layers.4.", "model.layers.5.", "model.norm.", "lm_head."))
    assert not got & shards_with(models["sharded"], ("model.embed_tokens.", "model.layers.0."))


def test_stage_tensors_tied_head_and_global_tensors():
    names = ["model.embed_tokens.weight", "model.norm.weight", *(f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)),
             "model.layers.7.mtp.weight"]  # a layer past num_layers (a multi-token-prediction head): nobody's
    assert hub.stage_tensors(names, 0, 2, 4) == {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                                                "model.layers.1.mlp.up_proj.weight"}
    # no lm_head in the checkpoint: the head is the embedding, so the last stage reads it too
    assert hub.stage_tensors(names, 2, 4, 4) == {"model.embed_tokens.weight", "model.norm.weight",
                                                "model.layers.2.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"}
    untied = [*names, "lm_head.weight"]
    assert hub.stage_tensors(untied, 2, 4, 4) == {"lm_head.weight", "model.norm.weight",
                                                 "model.layers.2.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"}
    with pytest.raises(ValueError):
        hub.stage_tensors(names, 3, 5, 4)


def test_a_single_file_repo_gives_a_stage_that_file(mirror):
    source = resolve_model(SINGLE, need="headers")
    assert mirror.downloaded(SINGLE) == {*GATEWAY_FILES, hub.SINGLE}
    fetch_layers(source, 2, 4)  # already there: nothing more
    assert mirror.downloaded(SINGLE) == {*GATEWAY_FILES, hub.SINGLE}
    assert (source.path / hub.SINGLE).is_file()


def test_the_gateway_fetches_only_config_and_tokenizer(mirror):
    source = resolve_model(SHARDED, need="config")
    assert mirror.downloaded(SHARDED) == GATEWAY_FILES
    assert not mirror.header_reads(SHARDED)
    assert source.name == SHARDED and source.hub_id == SHARDED and (source.path / "tokenizer.json").is_file()


def test_a_whole_download_and_a_revision(mirror, models):
    source = resolve_model(SHARDED, revision="v1")  # need="all": every shard (parallax up, tools)
    every_shard = set(json.loads((models["sharded"] / hub.INDEX).read_text())["weight_map"].values())
    assert mirror.downloaded(SHARDED) == {*GATEWAY_FILES, hub.INDEX, *every_shard}
    assert source.path.name == Repo(models["sharded"]).commit
    assert ("GET", f"/api/models/{SHARDED}/revision/v1") in mirror.requests
    with pytest.raises(UsageError, match="applies to a Hugging Face id"):
        resolve_model(str(models["sharded"]), revision="v1")


def test_parallax_up_downloads_once_and_pins_its_children_to_the_commit(mirror, models):
    import parallax.cli as cli

    args = cli.build_parser().parse_args(["up", "--model", SHARDED, "--revision", "v1", "--stages", "2"])
    plan = cli.plan_up(args)
    commit = Repo(models["sharded"]).commit
    every_shard = set(json.loads((models["sharded"] / hub.INDEX).read_text())["weight_map"].values())
    assert mirror.downloaded(SHARDED) == {*GATEWAY_FILES, hub.INDEX, *every_shard}
    assert plan.revision == commit and plan.served_name == SHARDED and plan.ranges == [(0, 3), (3, 6)]
    nats = NatsOptions("nats://x")
    for command in (cli.stage_command(plan, 0, 3, nats), cli.gateway_command(plan, nats)):
        assert command[command.index("--revision") + 1] == commit
    mirror.stop()  # the children find that commit in the cache
    assert resolve_model(SHARDED, revision=commit, need="headers").path.name == commit


def test_a_second_start_works_from_the_cache_with_the_hub_down(mirror):
    source = resolve_model(SHARDED, need="headers")
    fetch_layers(source, 0, 2)
    mirror.stop()
    again = resolve_model(SHARDED, need="headers")
    assert again == source
    fetch_layers(again, 0, 2)  # its shards are cached
    # (shards that never came, with the Hub down, end in HubUnreachable after huggingface_hub's own retries, ~23 s:
    # not run here for the suite's time; test_hub_down_and_nothing_cached checks the error's line)


# ----------------------------------------------------------------------------- one-line errors


def test_unknown_repo(mirror):
    with pytest.raises(ModelNotFound) as info:
        resolve_model("acme/no-such-model")
    text = one_line(info.value)
    assert "'acme/no-such-model' is not on " + mirror.url in text and "HF_TOKEN" in text


def test_unknown_revision(mirror):
    with pytest.raises(ModelNotFound) as info:
        resolve_model(SHARDED, revision="v9")
    assert "has no revision 'v9'" in one_line(info.value)


def test_gated_repo_needs_a_token(mirror, monkeypatch):
    with pytest.raises(GatedModel) as info:
        resolve_model(GATED, need="config")
    text = one_line(info.value)
    assert "is gated" in text and "set HF_TOKEN" in text and f"{mirror.url}/{GATED}" in text
    monkeypatch.setenv("HF_TOKEN", "hf_someone_else")
    with pytest.raises(GatedModel, match="your HF_TOKEN has no access"):
        resolve_model(GATED, need="config")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    source = resolve_model(GATED, need="headers")
    fetch_layers(source, 0, 2)
    assert (source.path / "config.json").is_file()


def test_hub_down_and_nothing_cached(mirror):
    mirror.stop()
    with pytest.raises(HubUnreachable) as info:
        resolve_model(SHARDED, need="config")
    text = one_line(info.value)
    assert f"cannot reach {mirror_url(text)}" in text and "not in the local Hugging Face cache" in text


def mirror_url(text: str) -> str:
    return text.split("cannot reach ", 1)[1].split(" ", 1)[0]


def test_offline_mode_and_nothing_cached(mirror, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachable, match="HF_HUB_OFFLINE is set"):
        resolve_model(SHARDED, need="config")
    assert not mirror.requests


def test_an_unsupported_architecture_stops_before_any_weights(mirror):
    from parallax.stages.models import architecture

    with pytest.raises(UnsupportedModel) as info:
        resolve_model(ODD, check=architecture)
    assert "'gpt2' is not supported (have: llama" in one_line(info.value)
    assert mirror.downloaded(ODD) == {"config.json"}


def test_cli_errors_are_one_line_and_exit_2(mirror):
    for command in (["parallax.gateway.cli", "--model", "acme/no-such-model"],
                    ["parallax.cli", "up", "--model", GATED, "--stages", "1"]):
        result = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=120)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and ": error: " in lines[0], result.stderr
    assert "is gated" in lines[0]


# ----------------------------------------------------------------------------- progress in the registry


async def test_a_loading_stage_shows_its_download_in_the_registry(mirror, nats_url):
    """A stage placed by the scheduler downloads its shards while registered as loading; the registry
    record carries the progress and ``parallax status`` shows it (``loading 100%`` here: the load holds
    until the test has seen the record)."""
    from parallax.broker.kv import nodes_bucket, snapshot
    from parallax.broker.registry import Assignment, NodeInfo, assign_key
    from parallax.stages.auto import AutoStage
    from parallax.stages.engine import EngineConfig
    from parallax.stages.profile import model_profile
    from parallax.stages.torch_backend import TorchBackend
    from parallax.stages.worker import NodeFacts, WorkerConfig
    from parallax.status import build_status, render_table

    source = resolve_model(SHARDED, need="headers")
    release, seen = threading.Event(), []

    def load(start: int, end: int):
        fetch_layers(source, start, end, lambda f: (seen.append(f), stage.downloaded(f)))
        release.wait(60)
        return TorchBackend.load(source.path, source.name, start, end, "float32", "cpu")

    facts = NodeFacts(manual=False, profile=model_profile(source.path, "float32"), memory_offered=1 << 30)
    stage = AutoStage(SHARDED, 6, "cpu", "float32", load, lambda b: EngineConfig(kv_blocks=64),
                      WorkerConfig(nats=NatsOptions(nats_url), node_id="downloader", heartbeat_s=0.2), facts)
    stop = asyncio.Event()
    task = asyncio.create_task(stage.run(stop))
    nc = await nats.connect(nats_url)
    try:
        kv = await nodes_bucket(nc)
        assert stage.describe().progress is None  # waiting: nothing to show
        await kv.put(assign_key("downloader"), Assignment(node_id="downloader", model=SHARDED, start=0, end=2)
                     .model_dump_json().encode())
        record = await until(kv, "stage.downloader", lambda n: n.state == "loading" and n.progress == 1.0)
        assert record.progress == 1.0 and any(0 < f < 1 for f in seen)
        assert "loading 100%" in render_table(build_status(await snapshot(kv)))
        release.set()
        record = await until(kv, "stage.downloader", lambda n: n.state == "serving")
        assert record.progress is None and record.layers == (0, 2)
        assert NodeInfo.model_validate_json(b'{"node_id": "old"}').progress is None  # old records parse
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(task, 30)
        await nc.close()


async def until(kv, key: str, ok, timeout: float = 60.0):
    from parallax.broker.registry import NodeInfo

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = NodeInfo.model_validate_json((await kv.get(key)).value)
            if ok(info):
                return info
        except Exception:  # not written yet
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{key} never matched")


# ----------------------------------------------------------------------------- the real thing


@pytest.mark.slow
def test_stages_and_gateway_serve_an_hf_id_from_the_mirror(mirror, tiny_model_dir, tmp_path):
    """Two parallax-stage processes and a gateway on an HF id the mirror serves (a 6-layer Llama with
    SmolLM2's tokenizer, in shards): each fetches what it needs into one HF cache, and a completion comes."""
    from transformers import AutoModelForCausalLM

    from parallax.broker.server import EmbeddedServer, ServerConfig, free_port
    from parallax.procs import ProcessGroup
    from tests.test_e2e import wait_health

    repo = tmp_path / "tiny-llama-sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(repo, max_shard_size="2MB")
    for extra in tiny_model_dir.iterdir():
        if not extra.name.endswith(".safetensors") and extra.name != hub.INDEX and not (repo / extra.name).exists():
            shutil.copy(extra, repo)
    mirror.repos["acme/tiny-llama"] = Repo(repo)
    port, logs = free_port(), tmp_path / "logs"
    logs.mkdir()
    with EmbeddedServer(ServerConfig(port=free_port())) as srv, ProcessGroup() as group:
        def start(name: str, module: str, *args: str) -> None:
            out = open(logs / f"{name}.log", "w")
            group.spawn(name, [sys.executable, "-m", module, "--model", "acme/tiny-llama", "--nats", srv.url, *args],
                        stdout=out, stderr=subprocess.STDOUT)

        start("gateway", "parallax.gateway.cli", "--port", str(port))
        start("stage-0", "parallax.stages.cli", "--layers", "0:3", "--dtype", "float32", "--kv-cache-memory", "0.05")
        start("stage-1", "parallax.stages.cli", "--layers", "3:6", "--dtype", "float32", "--kv-cache-memory", "0.05")
        base = f"http://127.0.0.1:{port}"
        try:
            wait_health(base, group, timeout=240)
        except (RuntimeError, TimeoutError):
            pytest.fail("\n".join(f"{p.name}: {p.read_text()[-1500:]}" for p in logs.iterdir()))
        reply = httpx.post(f"{base}/v1/completions", timeout=120,
                           json={"model": "acme/tiny-llama", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
    gets = [path for method, path in mirror.requests if method == "GET" and path.endswith(".safetensors")]
    assert len(gets) == len(set(gets))  # one shared cache: every shard came once
