"""llama.cpp, transformers and ``parallax up`` side by side: decode tok/s and per-stage memory (issue 9).

    python -m bench.side_by_side                                     # every model and system (see README)
    python -m bench.side_by_side --models smollm2-q4_1 --new-tokens 32 --streams 4   # a few minutes

One run, same CPU, same thread count (``--threads``, default 2) for every system, greedy, exactly
``--new-tokens`` per request (llama.cpp does not stop at EOS in ``Llama.generate``; the gateway gets
``ignore_eos``); rates are computed from the tokens each system really generated:

- **llama.cpp** (llama-cpp-python, built by ``bench/llamacpp.sh`` into its own venv) on a model's GGUF:
  single-stream decode tok/s, in a child process (peak RSS from ``ru_maxrss``).
- **transformers** decode loop (``bench.baselines.decode_loop_rate``) on the bf16 folder, batch 1 and
  batch ``--streams``, in a child process.
- **step**: the decode step of a stage holding the whole model, in a child process (``TorchBackend.run`` as a
  stage loads the model, one row a step, greedy; no event loop, NATS or gateway): what serving adds is the gap
  between it and ``parallax up --stages 1``.
- **parallax** ``up --stages 1`` and ``--stages 2`` (``--threads`` per stage): one stream's decode tok/s and
  ``--streams`` concurrent streams' aggregate decode tok/s through the OpenAI API (tokens streamed while all
  of them decode / that time: prefill left out, as in the decode loop's figure; completion tokens / wall time
  beside it); per stage the peak RSS of its
  process (psutil, sampled every 0.2 s from start to stop) next to its weight bytes (its registry profile,
  from ``parallax status --json``) and its KV budget (``parallax.stats``).

The single stream runs ``--single-runs`` times (default 3) for llama.cpp, the step and each ``parallax up``, in
rounds: llama.cpp and the step (each model loaded once, in its worker) and both clusters start and stay up, and
each round runs one single stream of each, in turn, while the others idle; each system's figure is the median
run's (every run's rate is in the JSON). On a shared machine one run of 64 tokens moves by 10-20 %, and the drift
over minutes moves every system's runs of one round alike instead of one system's all. Then each system finishes alone
(transformers, parallax's concurrent streams) while the others idle; results go to
``bench/results/side_by_side.{json,md}``, and the markdown table (with the targets) is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from bench import report, synth
from bench.cluster import ClusterError
from bench.serve import DEFAULT_OUT, run_interruptible
from parallax.broker.model import default_cache_dir

GiB = 1024**3
BENCH_CACHE = default_cache_dir() / "bench"
LLAMACPP_PYTHON = BENCH_CACHE / "llamacpp-venv" / "bin" / "python"
SYNTH_DIR = synth.DEFAULT_OUT
SYSTEMS = ("llamacpp", "transformers", "step", "parallax1", "parallax2")
MODELS = ("smollm2-q4_1", "smollm2-bf16", "synth-q4_0", "synth-q8_0", "synth-bf16")
DEFAULT_MODELS = ("smollm2-q4_1", "smollm2-bf16", "synth-q4_0")
RSS_SAMPLE_S = 0.2
WORKER_TIMEOUT_S = 3600.0
# targets (issue 9)
SINGLE_VS_LLAMACPP = {1: 1.0, 2: 0.85}
BATCH_VS_TRANSFORMERS = 1.5
RSS_SLACK, RSS_EXTRA = 1.15, int(0.7 * 1e9)
SYNTH_Q4_STAGE_RSS = int(1.5 * 1e9)


@dataclass(frozen=True)
class ModelSpec:
    """One model as each system takes it: a GGUF (llama.cpp), a bf16 folder (transformers), what
    ``parallax up --model`` gets, and the folder whose tokenizer builds the prompts."""

    key: str
    tokenizer: Path
    parallax_model: str
    gguf: Path | None = None
    hf_bf16: Path | None = None
    stage_args: tuple[str, ...] = ()

    def systems(self) -> tuple[str, ...]:
        return ((("llamacpp",) if self.gguf else ()) + (("transformers",) if self.hf_bf16 else ())
                + ("step", "parallax1", "parallax2"))


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    systems: tuple[str, ...]
    threads: int
    new_tokens: int
    input_len: int
    streams: int
    seed: int
    synth_dir: Path
    llamacpp_python: Path
    out: Path
    kv_cache_gib: float | None
    single_runs: int = 3  # single-stream runs per system; its figure is their median

    def __post_init__(self) -> None:
        for name in ("threads", "new_tokens", "input_len", "streams", "single_runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.new_tokens < 2:
            raise ValueError("--new-tokens must be at least 2 (decode rates need two tokens)")
        for name, allowed, label in ((self.models, MODELS, "model"), (self.systems, SYSTEMS, "system")):
            unknown = sorted(set(name) - set(allowed))
            if unknown:
                raise ValueError(f"unknown {label} {', '.join(unknown)}; choose from {', '.join(allowed)}")


def say(line: str) -> None:
    print(f"side-by-side {time.strftime('%H:%M:%S')}: {line}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ models
def smollm2_dense() -> Path:
    from parallax.broker.model import resolve_model

    try:
        return Path(resolve_model("smollm2-135m", dequantize=True).path)
    except TypeError:  # before --dequantize existed, the alias always resolved to the dense folder
        return Path(resolve_model("smollm2-135m").path)


def smollm2_bf16() -> Path:
    """SmolLM2's dense checkpoint cast to bf16 (once, in the bench cache): 'SmolLM2 bf16'."""
    out = BENCH_CACHE / "smollm2-bf16"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from safetensors.torch import load_file, save_file

    dense = smollm2_dense()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in dense.iterdir():
        if file.suffix != ".safetensors":
            shutil.copyfile(file, tmp / file.name)
    tensors = {}
    for file in sorted(dense.glob("*.safetensors")):
        tensors.update({k: v.to(torch.bfloat16) for k, v in load_file(file).items()})
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def model_spec(key: str, settings: Settings) -> ModelSpec:
    from parallax.broker.model import smollm2_gguf

    synth_hf = settings.synth_dir / "hf"
    kv = ("--kv-cache-memory", str(settings.kv_cache_gib if settings.kv_cache_gib is not None else 0.25))
    if key == "smollm2-q4_1":
        return ModelSpec(key, smollm2_dense(), "smollm2-135m", gguf=smollm2_gguf())
    if key == "smollm2-bf16":
        folder = smollm2_bf16()
        return ModelSpec(key, folder, str(folder), hf_bf16=folder)
    if not (synth_hf / "config.json").is_file():
        raise FileNotFoundError(f"no synthetic model in {settings.synth_dir}: run python -m bench.synth first")
    if key == "synth-bf16":
        return ModelSpec(key, synth_hf, str(synth_hf), hf_bf16=synth_hf, stage_args=kv)
    gguf = settings.synth_dir / f"synth-{key.split('-')[1]}.gguf"
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing: run python -m bench.synth --gguf {key.split('-')[1]}")
    return ModelSpec(key, synth_hf, str(gguf), gguf=gguf, stage_args=kv)


def make_prompts(spec: ModelSpec, settings: Settings) -> dict[str, list[list[int]]]:
    """Seeded prompts of exactly ``--input-len`` tokens: a warm-up, one single-stream, ``--streams`` batched."""
    from bench.prompts import build_prompts, tokenizer_encoder

    prompts = build_prompts(tokenizer_encoder(str(spec.tokenizer)), settings.seed, settings.input_len,
                            [1, settings.streams], prefix_len=0, memory_requests=0, warmup_requests=2)
    return {"warmup": prompts.warmup, "single": prompts.levels[0], "batch": prompts.levels[1]}


# ----------------------------------------------------------------------------------------- workers
def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def answer_rounds(run: Callable[[list[int], int], tuple[float, list[float]]], job: dict[str, Any], commands: TextIO,
                  out: TextIO) -> None:
    """A worker's rounds: ``run(ids, n)`` (its start time, each token's time) on the warm-up prompt, a ready line,
    then for every line on ``commands`` one run of the single stream and its rates as one JSON line."""
    run(job["warmup"], 4)
    print(json.dumps({"ready": True}), file=out, flush=True)
    for _ in commands:
        started, times = run(job["prompt"], job["new_tokens"])
        decode_s = times[-1] - times[0]
        print(json.dumps({"tokens": len(times), "prefill_s": times[0] - started, "decode_s": decode_s,
                          "decode_tok_s": (len(times) - 1) / decode_s if decode_s > 0 else None}), file=out, flush=True)


def llamacpp_worker(job: dict[str, Any], commands: TextIO, out: TextIO) -> None:
    """Greedy decode of ``new_tokens`` with llama-cpp-python: the model loads once and warms up, then every
    line on ``commands`` runs the single stream once (prefill, then per-token times) and answers one JSON
    line; at the end of ``commands`` a last line says the version and the peak RSS."""
    import llama_cpp

    threads = job["threads"]
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=len(job["prompt"]) + job["new_tokens"] + 16, n_batch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)

    def run(ids: list[int], n: int) -> tuple[float, list[float]]:
        llm.reset()
        started, times = time.perf_counter(), []
        for _ in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())  # generate() never stops at EOS: we stop after n
            if len(times) == n:
                break
        return started, times

    answer_rounds(run, job, commands, out)
    print(json.dumps({"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode(),
                      "peak_rss_bytes": peak_rss_bytes()}), file=out, flush=True)


def step_worker(job: dict[str, Any], commands: TextIO, out: TextIO) -> None:
    """The decode step of a stage holding the whole model, in this process (``TorchBackend.run``, as a stage loads
    it with ``--dtype bfloat16``): no event loop, NATS or gateway around it. Every line on ``commands`` runs the
    prompt, then ``new_tokens - 1`` steps of one generated row (greedy), and answers one JSON line."""
    import parallax.stages  # noqa: F401  first, as in a stage process: it sets GOMP_SPINCOUNT before torch loads libgomp

    import numpy as np
    import torch

    from parallax.broker.model import ModelFacts, resolve_model
    from parallax.broker.wire import SamplingParams
    from parallax.stages.backend import SampleSpec, StepItem
    from parallax.stages.torch_backend import TorchBackend

    torch.set_num_threads(job["threads"])
    source = resolve_model(job["model"])
    backend = TorchBackend.load(source.path, source.name, 0, ModelFacts.read(source.path).num_layers, "bfloat16", "cpu")
    block, blocks = 16, (len(job["prompt"]) + job["new_tokens"]) // 16 + 1
    backend.init_kv(blocks, block)
    greedy = SampleSpec(SamplingParams(temperature=0.0, max_tokens=job["new_tokens"]), (), 0)
    table = tuple(range(blocks))

    def run(ids: list[int], n: int) -> tuple[float, list[float]]:
        started, times, pos = time.perf_counter(), [], 0
        while len(times) < n:
            data = memoryview(np.asarray(ids, np.int32).tobytes())
            token = backend.run([StepItem("r", pos, len(ids), data, "int32", greedy, table, prompt=pos == 0)]).tokens[0]
            times.append(time.perf_counter())
            pos, ids = pos + len(ids), [token]
        return started, times

    answer_rounds(run, job, commands, out)
    print(json.dumps({"kernels": backend.kernels, "peak_rss_bytes": peak_rss_bytes()}), file=out, flush=True)


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose ``key`` is the median (the lower middle one of an even count; runs without it last)."""
    ordered = sorted(runs, key=lambda r: (r[key] is None, r[key] or 0.0))
    return ordered[(len(ordered) - 1) // 2]


def transformers_worker(job: dict[str, Any]) -> dict[str, Any]:
    """``bench.baselines.decode_loop_rate`` (bf16) at batch 1 and batch ``len(batch)``."""
    import torch

    from bench.baselines import decode_loop_rate, load_model

    torch.set_num_threads(job["threads"])
    model = load_model(job["folder"], "bfloat16")
    pad = model.config.pad_token_id if isinstance(model.config.pad_token_id, int) else 0
    one = decode_loop_rate(model, job["single"], job["new_tokens"], pad)
    many = decode_loop_rate(model, job["batch"], job["new_tokens"], pad)
    return {"threads": torch.get_num_threads(), "b1": one, "batched": many, "peak_rss_bytes": peak_rss_bytes()}


WORKERS = ("llamacpp", "step", "transformers")


def worker_env(threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    return env


def run_worker(python: Path | str, kind: str, job: dict[str, Any], log: Path) -> dict[str, Any]:
    """``python -m bench.side_by_side --worker KIND`` with the job on stdin; its last stdout line is JSON."""
    with open(log, "ab") as err:
        done = subprocess.run([str(python), "-m", "bench.side_by_side", "--worker", kind], input=json.dumps(job),
                              stdout=subprocess.PIPE, stderr=err, text=True, env=worker_env(job["threads"]),
                              timeout=WORKER_TIMEOUT_S, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} worker exited with code {done.returncode}; see {log}")
    return json.loads(lines[-1])


class WorkerSession:
    """A model loaded once in a worker process (``llamacpp_worker``, ``step_worker``) for the model's whole run."""

    def __init__(self, python: Path | str, kind: str, job: dict[str, Any], log: Path) -> None:
        self._log, self._kind = log, kind
        with open(log, "ab") as err:
            self._proc = subprocess.Popen([str(python), "-m", "bench.side_by_side", "--worker", kind],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                          env=worker_env(job["threads"]))
        self.runs: list[dict[str, Any]] = []
        self._send(json.dumps(job))
        self._reply()  # loaded and warmed up

    def single(self) -> None:
        self._send("single")
        self.runs.append(self._reply())

    def finish(self) -> dict[str, Any]:
        self._proc.stdin.close()
        info = self._reply()
        return {**info, **median_run(self.runs, "decode_tok_s"), "decode_runs": [r["decode_tok_s"] for r in self.runs]}

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()

    def _send(self, line: str) -> None:
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()

    def _reply(self) -> dict[str, Any]:
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self._kind} worker exited with code {self._proc.wait()}; see {self._log}")
        return json.loads(line)


def llamacpp_python(settings: Settings) -> Path | str | None:
    """A python that imports llama_cpp: this one, else the benchmark venv's (bench/llamacpp.sh)."""
    candidates: list[Path | str] = [sys.executable, settings.llamacpp_python]
    for python in candidates:
        if Path(python).is_file() and subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True,
                                                      check=False).returncode == 0:
            return python
    return None


# ---------------------------------------------------------------------------------------- parallax
class RssSampler:
    """Peak RSS per PID, sampled on a thread every ``every_s`` until stopped."""

    def __init__(self, pids: Sequence[int], every_s: float = RSS_SAMPLE_S) -> None:
        import psutil

        self._procs = {pid: psutil.Process(pid) for pid in pids}
        self.peak: dict[int, int] = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), daemon=True)

    def _loop(self, every_s: float) -> None:
        import psutil

        while not self._stop.is_set():
            for pid, proc in self._procs.items():
                try:
                    self.peak[pid] = max(self.peak[pid], proc.memory_info().rss)
                except psutil.Error:
                    pass
            self._stop.wait(every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stage_pids(pids: Sequence[int]) -> dict[str, int]:
    """``"start:end" -> PID`` of every ``parallax.stages.cli`` process among ``pids``."""
    import psutil

    found: dict[str, int] = {}
    for pid in pids:
        try:
            cmd = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue
        if "parallax.stages.cli" in cmd and "--layers" in cmd:
            found[cmd[cmd.index("--layers") + 1]] = pid
    return found


def registry_stages(nats_url: str) -> dict[str, dict[str, Any]]:
    """``"start:end" -> node`` from ``parallax status --json`` (stage nodes with their profile)."""
    done = subprocess.run([sys.executable, "-m", "parallax.cli", "status", "--nats", nats_url, "--json"],
                          capture_output=True, text=True, timeout=60, check=False)
    try:
        nodes = json.loads(done.stdout)["nodes"]
    except (ValueError, KeyError):
        say(f"parallax status gave no JSON: {done.stderr.strip()[-300:]}")
        return {}
    return {f"{n['start']}:{n['end']}": n for n in nodes if n.get("kind") == "stage" and n.get("start") is not None}


def weight_bytes(node: dict[str, Any], tied: bool) -> int | None:
    """What the stage's profile says it holds: its layers, the embedding at layer 0, norm + head at the end
    (a tied head held with the embedding counts once)."""
    profile, start, end = node.get("profile"), node.get("start"), node.get("end")
    if not profile:
        return None
    total = (end - start) * profile["layer_bytes"]
    first, last = start == 0, end == profile["num_layers"]
    total += profile["first_bytes"] * first + profile["last_bytes"] * last
    return total - profile["first_bytes"] if tied and first and last else total


class ParallaxSession:
    """One ``parallax up --stages N`` for a model's whole run: warmed up at start, then its single streams one
    at a time (``single``), and at the end its ``--streams`` concurrent streams, stats and memory (``finish``)."""

    def __init__(self, spec: ModelSpec, stages: int, prompts: dict[str, list[list[int]]], settings: Settings,
                 stack: contextlib.ExitStack) -> None:
        import shlex

        from bench.cluster import ClusterSpec, running_cluster

        self.spec, self.stages, self.prompts, self.settings = spec, stages, prompts, settings
        stage_args = ("--threads", str(settings.threads), *spec.stage_args)
        cluster = ClusterSpec(spec.parallax_model, stages, "bfloat16", ("--stage-args", shlex.join(stage_args)))
        self.log = settings.out / f"side_by_side-{spec.key}-s{stages}.log"
        started = time.perf_counter()
        self.endpoint = stack.enter_context(running_cluster(cluster, self.log))
        self.ready_s = time.perf_counter() - started
        self.pids = stage_pids(self.endpoint.pids)
        self.rss = stack.enter_context(RssSampler(list(self.pids.values())))
        self.singles: list[dict[str, Any]] = []
        run_interruptible_result(self._requests("warmup", 4, len(prompts["warmup"])))

    def single(self) -> None:
        self.singles.append(run_interruptible_result(self._requests("single", self.settings.new_tokens, 1)))

    def finish(self) -> dict[str, Any]:
        from parallax.broker.model import read_config

        s = self.settings
        batch = run_interruptible_result(self._requests("batch", s.new_tokens, s.streams))
        kv = run_interruptible_result(self._kv_budgets())
        nodes = registry_stages(self.endpoint.nats_url)
        tied = bool(read_config(self.spec.tokenizer).get("tie_word_embeddings", False))
        per_stage = [{"stage": layers, "pid": pid, "peak_rss_bytes": self.rss.peak.get(pid) or None,
                      "weight_bytes": weight_bytes(nodes[layers], tied) if layers in nodes else None,
                      "kv_budget_bytes": kv.get(layers)}
                     for layers, pid in sorted(self.pids.items(), key=lambda kv: int(kv[0].split(":")[0]))]
        rate = "decode_tok_s_per_stream"
        return {"stages": self.stages, "ready_s": self.ready_s, "single": median_run(self.singles, rate),
                "single_runs": [r[rate] for r in self.singles], "batch": batch,
                "per_stage": per_stage, "log": str(self.log)}

    async def _requests(self, prompts: str, max_tokens: int, concurrency: int) -> dict[str, Any]:
        from bench.client import make_http_client, run_requests, served_model
        from bench.stats import summarize_level

        async with make_http_client(self.endpoint.url, self.settings.streams) as http:
            model = await served_model(http)
            done, wall = await run_requests(http, model, self.prompts[prompts], max_tokens, concurrency)
        return summarize_level(done, concurrency, wall)

    async def _kv_budgets(self) -> dict[str, Any]:
        from bench.natsstats import stage_label, stats_client

        async with stats_client(self.endpoint.nats_url, self.endpoint.stages) as stats:
            replies = await stats.collect()
        return {stage_label(r): (r.get("kv") or {}).get("budget_bytes") for r in replies}


def run_interruptible_result(phases: Any) -> dict[str, Any]:
    box: dict[str, Any] = {}

    async def keep() -> None:
        box.update(await phases)

    run_interruptible(keep())
    return box


# -------------------------------------------------------------------------------------------- run
class Contender(Protocol):
    """A system whose single stream is measured in rounds with the others'."""

    def single(self) -> None: ...

    def finish(self) -> dict[str, Any]: ...


FAILURES = (ClusterError, RuntimeError, OSError, subprocess.SubprocessError, ValueError)


def run_model(key: str, settings: Settings, say_: Callable[[str], None] = say) -> dict[str, Any]:
    """Every system of ``key``: those with a single stream start first and stay up, their single streams run in
    rounds (one run of each, in turn: a shared machine's drift moves them alike), then each system finishes
    alone (transformers, parallax's concurrent streams) while the others idle."""
    spec = model_spec(key, settings)
    prompts = make_prompts(spec, settings)
    result: dict[str, Any] = {"model": key, "gguf": str(spec.gguf) if spec.gguf else None,
                              "gguf_bytes": spec.gguf.stat().st_size if spec.gguf else None,
                              "parallax_model": spec.parallax_model}
    log = settings.out / f"side_by_side-{key}-workers.log"
    systems = [s for s in settings.systems if s in spec.systems()]
    with contextlib.ExitStack() as stack:
        contenders: dict[str, Contender] = {}
        for system in (s for s in systems if s != "transformers"):
            say_(f"{key}: starting {system}")
            started = _attempt(key, system, result, say_,
                               lambda: start_contender(system, spec, prompts, settings, log, stack))
            if started is not None:
                contenders[system] = started
        interleave(contenders, settings.single_runs, lambda system, exc: _failed(key, system, exc, result, say_))
        for system in systems:
            if system in result:  # failed or skipped
                continue
            say_(f"{key}: {system}")
            done = _attempt(key, system, result, say_, contenders[system].finish if system in contenders
                            else lambda: run_transformers(spec, prompts, settings, log))
            if done is not None:
                result[system] = done
    return result


def interleave(contenders: dict[str, Contender], rounds: int, failed: Callable[[str, Exception], None]) -> None:
    """``rounds`` single streams of each contender, one of each per round in turn; one that fails is
    reported to ``failed`` and left out of the rounds after."""
    for _ in range(rounds):
        for system, contender in list(contenders.items()):
            try:
                contender.single()
            except FAILURES as exc:
                failed(system, exc)
                del contenders[system]


class Skipped(Exception):
    """A system that cannot run here (llama.cpp not built): reported, not a failure."""


def _attempt(key: str, system: str, result: dict[str, Any], say_: Callable[[str], None], fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Skipped as exc:
        result[system] = {"skipped": str(exc)}
        say_(f"skipping {system}: {exc}")
        return None
    except FAILURES as exc:
        _failed(key, system, exc, result, say_)
        return None


def _failed(key: str, system: str, exc: Exception, result: dict[str, Any], say_: Callable[[str], None]) -> None:
    detail = str(exc)[-1500:] if isinstance(exc, ClusterError) else str(exc)[:500]  # a cluster's log tail
    result[system] = {"error": f"{type(exc).__name__}: {detail}"}
    say_(f"{key}: {system} failed: {result[system]['error'][:300]}")


def start_contender(system: str, spec: ModelSpec, prompts: dict[str, list[list[int]]], settings: Settings, log: Path,
                    stack: contextlib.ExitStack) -> Contender:
    """The system up and warmed up (stopped when ``stack`` closes)."""
    if system.startswith("parallax"):
        return ParallaxSession(spec, int(system[-1]), prompts, settings, stack)
    job = {"threads": settings.threads, "new_tokens": settings.new_tokens, "prompt": prompts["single"][0],
           "warmup": prompts["warmup"][0][:8]}
    if system == "step":
        session = WorkerSession(sys.executable, "step", {**job, "model": spec.parallax_model}, log)
    elif (python := llamacpp_python(settings)) is not None:
        session = WorkerSession(python, "llamacpp", {**job, "gguf": str(spec.gguf)}, log)
    else:
        raise Skipped(f"llama-cpp-python not importable here nor in {settings.llamacpp_python}: run bench/llamacpp.sh")
    stack.callback(session.close)
    return session


def run_transformers(spec: ModelSpec, prompts: dict[str, list[list[int]]], settings: Settings,
                     log: Path) -> dict[str, Any]:
    job = {"threads": settings.threads, "new_tokens": settings.new_tokens, "folder": str(spec.hf_bf16),
           "single": prompts["single"], "batch": prompts["batch"]}
    return run_worker(sys.executable, "transformers", job, log)


# ----------------------------------------------------------------------------------------- report
def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.2f}"


def num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "n/a"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return " ".join(sorted({f for f in flags if f == "avx2" or f.startswith("avx512") or f.startswith("amx")}))


def rates(result: dict[str, Any], system: str) -> tuple[float | None, float | None, str]:
    """(single-stream decode tok/s, batched decode tok/s (prefill left out), tokens generated) of one system."""
    r = result.get(system) or {}
    if "error" in r or "skipped" in r or not r:
        return None, None, r.get("error", r.get("skipped", "not run"))[:60] if r else "not run"
    if system in ("llamacpp", "step"):
        return r["decode_tok_s"], None, f"{r['tokens']}"
    if system == "transformers":
        b = r["batched"]
        return r["b1"]["decode_tok_s"], b["decode_tok_s"], f"{r['b1']['new_tokens']} / {b['batch']}x{b['new_tokens']}"
    s, b = r["single"], r["batch"]
    return (s["decode_tok_s_per_stream"], b.get("decode_tok_s_aggregate"),
            f"{s['completion_tokens']} / {b['completion_tokens']}")


def wall_rate(result: dict[str, Any], system: str) -> float | None:
    """parallax's batched completion tokens / wall time, prefill included."""
    r = result.get(system) or {}
    return (r.get("batch") or {}).get("output_tok_s") if system.startswith("parallax") else None


def system_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for system in SYSTEMS:
        if system not in result:
            continue
        single, batch, tokens = rates(result, system)
        rows.append([result["model"], system, tokens, num(single), num(batch), num(wall_rate(result, system))])
    return rows


def rss_bound(stage: dict[str, Any]) -> float | None:
    """Issue 9's per-stage memory target: 1.15 x weights as stored + KV budget + 0.7 GB."""
    weights = stage["weight_bytes"]
    return None if weights is None else RSS_SLACK * weights + (stage["kv_budget_bytes"] or 0) + RSS_EXTRA


def memory_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for system in ("parallax1", "parallax2"):
        for stage in (result.get(system) or {}).get("per_stage", []):
            rss = stage["peak_rss_bytes"]
            rows.append([result["model"], system, stage["stage"], gib(rss), gib(stage["weight_bytes"]),
                         gib(stage["kv_budget_bytes"]), num(ratio(rss, rss_bound(stage)), "{:.2f}")])
    llama = result.get("llamacpp") or {}
    if llama.get("peak_rss_bytes"):
        rows.append([result["model"], "llamacpp", "all", gib(llama["peak_rss_bytes"]), gib(result["gguf_bytes"]),
                     "n/a", "n/a"])
    return rows


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 9's targets over whatever was measured (``value`` is the ratio, ``n/a`` when a side is missing)."""
    out = []
    by_model = {r["model"]: r for r in results}
    for key in ("smollm2-q4_1", "synth-q4_0", "synth-q8_0"):
        r = by_model.get(key)
        if r is None:
            continue
        llama = rates(r, "llamacpp")[0]
        for stages, need in SINGLE_VS_LLAMACPP.items():
            single = rates(r, f"parallax{stages}")[0]
            out.append(_target(f"{key}: --stages {stages} single stream / llama.cpp", ratio(single, llama), need))
    for key in ("smollm2-bf16", "synth-bf16"):
        r = by_model.get(key)
        if r is None:
            continue
        loop = rates(r, "transformers")[1]
        for stages in (1, 2):
            batch = rates(r, f"parallax{stages}")[1]
            out.append(_target(f"{key}: --stages {stages} aggregate / transformers loop batch", ratio(batch, loop),
                               BATCH_VS_TRANSFORMERS))
    for r in results:
        for system in ("parallax1", "parallax2"):
            for stage in (r.get(system) or {}).get("per_stage", []):
                out.append(_target(f"{r['model']} {system} stage {stage['stage']}: RSS / (1.15 w + kv + 0.7 GB)",
                                   ratio(stage["peak_rss_bytes"], rss_bound(stage)), 1.0, at_most=True))
    q4 = (by_model.get("synth-q4_0") or {}).get("parallax2") or {}
    for stage in q4.get("per_stage", []):
        out.append(_target(f"synth-q4_0 parallax2 stage {stage['stage']}: RSS / 1.5 GB",
                           ratio(stage["peak_rss_bytes"], SYNTH_Q4_STAGE_RSS), 1.0, at_most=True))
    return out


def _target(name: str, value: float | None, need: float, at_most: bool = False) -> dict[str, Any]:
    passed = None if value is None else (value <= need if at_most else value >= need)
    return {"target": name, "value": value, "need": f"{'<=' if at_most else '>='} {need}",
            "verdict": "n/a" if passed is None else "PASS" if passed else "FAIL"}


def _busy(machine: dict[str, Any]) -> list[str]:
    warning = report.busy_warning(machine)
    return ["", f"**Warning**: {warning}."] if warning else []


def serving_cost(results: list[dict[str, Any]]) -> list[str]:
    """One stream served by ``parallax up`` against the same decode step in process (``step``), per model."""
    parts = []
    for r in results:
        step = rates(r, "step")[0]
        served = [f"--stages {n} {num(ratio(rates(r, f'parallax{n}')[0], step), '{:.2f}')}" for n in (1, 2)]
        if step is not None:
            parts.append(f"{r['model']}: {', '.join(served)}")
    return ["", "One stream served / the step in process: " + "; ".join(parts) + "."] if parts else []


def markdown(doc: dict[str, Any]) -> str:
    m, s = doc["machine"], doc["settings"]
    lines = [f"# Side by side ({m['date']}, commit {m['git_commit']})", "",
             f"CPU: {m['cpu']} ({m['cores']} cores), flags: {doc['cpu_flags'] or 'none of avx2/avx512/amx'}; "
             f"load average {m['load_avg_at_start']} at start, {m.get('load_avg_at_end')} at end; "
             f"{s['threads']} threads per system/stage, greedy, {s['new_tokens']} new tokens, prompts of "
             f"{s['input_len']} tokens, {s['streams']} streams.", *_busy(m), "",
             "| model | system | tokens (1 / all streams) | decode tok/s, 1 stream | aggregate decode tok/s, "
             f"{s['streams']} streams | completion tok/s / wall, {s['streams']} streams |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for r in doc["results"] for row in system_rows(r)]
    lines += ["", "transformers: the decode loop's decode tok/s (prefill excluded) at batch 1 and batch "
              f"{s['streams']}; parallax: 1 stream's decode tok/s (first to last streamed token); {s['streams']} "
              "streams: tokens streamed while all of them were decoding / that time (prefill left out, as in the "
              "loop's figure), and completion tokens / wall time (prefill included).", *serving_cost(doc["results"]), "",
              "| model | system | stage | peak RSS GiB | weights GiB | KV budget GiB | RSS / bound |",
              "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for r in doc["results"] for row in memory_rows(r)]
    lines += ["", "bound = 1.15 x weights + KV budget + 0.7 GB (issue 9).", "", "| target | ratio | need | verdict |",
              "|---|---|---|---|"]
    lines += [f"| {t['target']} | {num(t['value'], '{:.2f}')} | {t['need']} | {t['verdict']} |" for t in doc["targets"]]
    errors = [f"- {r['model']} {k}: {v.get('error') or v.get('skipped')}" for r in doc["results"]
              for k, v in r.items() if isinstance(v, dict) and ("error" in v or "skipped" in v)]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


# ------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.side_by_side", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--threads", type=int, default=2, help="threads of llama.cpp, transformers and every stage")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (EOS ignored)")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams / transformers batch")
    p.add_argument("--seed", type=int, default=0, help="prompt seed")
    p.add_argument("--synth-dir", type=Path, default=SYNTH_DIR, help="output of python -m bench.synth")
    p.add_argument("--llamacpp-python", type=Path, default=LLAMACPP_PYTHON, help="python of bench/llamacpp.sh's venv")
    p.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB",
                   help="KV budget of the synthetic model's stages (default 0.25)")
    p.add_argument("--single-runs", type=int, default=Settings.single_runs,
                   help="single-stream runs per system (llama.cpp and parallax); each figure is their median")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for side_by_side.{json,md} and logs")
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    return p


def split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker in ("llamacpp", "step"):
        worker = llamacpp_worker if args.worker == "llamacpp" else step_worker
        worker(json.loads(sys.stdin.readline()), sys.stdin, sys.stdout)
        return 0
    if args.worker == "transformers":
        print(json.dumps(transformers_worker(json.loads(sys.stdin.read()))), flush=True)
        return 0
    try:
        settings = Settings(split(args.models), split(args.systems), args.threads, args.new_tokens, args.input_len,
                            args.streams, args.seed, args.synth_dir, args.llamacpp_python, args.out, args.kv_cache_memory,
                            args.single_runs)
    except ValueError as exc:
        print(f"side-by-side: {exc}", file=sys.stderr)
        return 2
    settings.out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"machine": report.machine_info(), "cpu_flags": cpu_flags(),
                           "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.__dict__.items()},
                           "results": [], "targets": []}
    warning = report.busy_warning(doc["machine"])
    if warning:
        say(f"warning: {warning}")
    code = 0
    try:
        for key in settings.models:
            try:
                doc["results"].append(run_model(key, settings))
            except FileNotFoundError as exc:
                say(f"{key}: {exc}")
                doc["results"].append({"model": key, "missing": {"error": str(exc)}})
                code = 2
    except KeyboardInterrupt:
        say("interrupted")
        code = 130
    finally:
        doc["machine"]["load_avg_at_end"] = report.load_average()
        doc["targets"] = targets(doc["results"])
        (settings.out / "side_by_side.json").write_text(json.dumps(doc, indent=2))
        text = markdown(doc)
        (settings.out / "side_by_side.md").write_text(text)
        print(text, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
