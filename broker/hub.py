"""Models from the Hugging Face Hub: what a process needs of a repo, downloaded into the HF cache.

Every process fetches the small files first: config.json (checked before anything large comes), the
generation config, the tokenizer files and the safetensors index. Then, by what it is:

* the gateway: nothing more;
* a stage: the safetensors headers of every shard (a few KB each, HTTP range requests; the profile the
  scheduler places by needs every layer's sizes), and, once it knows its layers, only the shards that
  hold them (:func:`fetch_layers`: the embedding on the first stage, norm + lm_head on the last, the
  embedding there too when the head is tied to it). A repo with one ``model.safetensors``: that file;
* ``parallax up`` (every stage on one machine) and other tools: every safetensors file.

Files land in the HF cache (``HF_HOME``/``HF_HUB_CACHE``), so a second start needs no network.
``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` are read when a call is made. Hub failures
become one-line errors of :mod:`.errors` (exit 2).

huggingface_hub is imported lazily.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import GatedModel, HubUnreachable, ModelNotFound

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"
METADATA = (CONFIG, "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
            "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
            "chat_template.json")  # what the gateway reads; a stage also reads the index
HEADERS_DIR = "parallax-headers"  # beside snapshots/ in a repo's HF cache folder: <commit>/<file>.json
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

Need = Literal["config", "headers", "all"]  # gateway; stage before its layers; every weight
Progress = Callable[[float], None]  # fraction of the bytes to download that has arrived (0..1)
Check = Callable[[dict], None]  # raises for a config.json this process cannot serve


@dataclass(frozen=True)
class HubSettings:
    """Where the Hub is and how to talk to it, read from the environment when a call is made."""

    endpoint: str
    offline: bool
    token: str | None = None  # None: huggingface_hub's own lookup (HF_TOKEN, a saved login)

    def __post_init__(self) -> None:
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"HF_ENDPOINT must be an http(s) URL, got {self.endpoint!r}")

    @classmethod
    def from_env(cls) -> "HubSettings":
        from huggingface_hub import constants

        endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        return cls(endpoint=endpoint, offline=offline or constants.HF_HUB_OFFLINE)


# --------------------------------------------------------------------------- what a stage needs


def stage_tensors(names: Iterable[str], start: int, end: int, num_layers: int) -> set[str]:
    """The checkpoint tensors a stage of layers ``start:end`` (of ``num_layers``) reads: its layers'
    (``...layers.N.``), the embedding on the first stage, every other global tensor (final norm,
    lm_head) on the last one, and the embedding there too when the checkpoint has no lm_head (tied)."""
    if not 0 <= start < end <= num_layers:
        raise ValueError(f"layers {start}:{end} are outside 0:{num_layers}")
    names = list(names)
    last, first = end == num_layers, start == 0
    tied = last and not any(n.startswith("lm_head.") for n in names)
    wanted = set()
    for name in names:
        layer = _LAYER.search(name)
        if layer is not None:
            keep = start <= int(layer.group(1)) < end
        elif "embed_tokens." in name:
            keep = first or tied
        else:
            keep = last
        if keep:
            wanted.add(name)
    return wanted


def stage_files(folder: Path, start: int, end: int, num_layers: int) -> list[str]:
    """The safetensors files that hold a stage's tensors (its shards, or the single file)."""
    index = folder / INDEX
    if not index.is_file():
        return [SINGLE]
    weight_map = json.loads(index.read_text())["weight_map"]
    return sorted({weight_map[n] for n in stage_tensors(weight_map, start, end, num_layers)})


def weight_files(folder: Path) -> list[str]:
    """Every safetensors file of a snapshot (from its index, or the single file)."""
    index = folder / INDEX
    if not index.is_file():
        return [SINGLE]
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


# --------------------------------------------------------------------------- downloads


def fetch(repo_id: str, revision: str | None, need: Need = "all", check: Check | None = None) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` with what ``need`` says downloaded;
    ``check`` sees config.json before anything large is fetched."""
    settings = HubSettings.from_env()
    _quiet_http_logs()
    with hub_errors(repo_id, revision, settings):
        folder = _download(repo_id, revision, settings, [CONFIG], bars=False)
        if check is not None:
            check(json.loads((folder / CONFIG).read_text()))
        small = list(METADATA) + ([] if need == "config" else [INDEX])
        folder = _download(repo_id, folder.name, settings, small, bars=False)
        if not (folder / INDEX).is_file() and need != "config" and not _in_repo(repo_id, folder, SINGLE):
            raise ModelNotFound(f"model '{repo_id}' has no safetensors weights ({SINGLE} or {INDEX}); "
                                "convert it, or pass a local HF folder or a .gguf file")
        if need == "headers" and not (folder / INDEX).is_file():  # one file: every stage reads it
            folder = _download(repo_id, folder.name, settings, [SINGLE])
        elif need == "headers":
            fetch_headers(repo_id, folder, settings)
        elif need == "all":
            folder = _download(repo_id, folder.name, settings, weight_files(folder))
    return folder


def fetch_layers(repo_id: str, folder: Path, start: int, end: int, num_layers: int,
                 progress: Progress | None = None) -> list[str]:
    """Download the shards of layers ``start:end`` into ``folder`` (a snapshot of ``repo_id``), with
    huggingface_hub's progress bar on the terminal and ``progress`` told the fraction done. Returns
    the files the stage reads."""
    settings = HubSettings.from_env()
    files = stage_files(folder, start, end, num_layers)
    missing = [f for f in files if not (folder / f).is_file()]
    sizes = _sizes(repo_id, folder)
    bytes_counter = _Counter(sum(sizes.get(f, 0) for f in missing), progress)
    with hub_errors(repo_id, folder.name, settings):
        for file in missing:
            _download_file(repo_id, folder.name, file, settings, bytes_counter.bar_class())
    bytes_counter.finish()
    return files


def fetch_headers(repo_id: str, folder: Path, settings: HubSettings) -> None:
    """Cache the header (tensor names, dtypes, shapes) of every shard the snapshot lacks, read with
    HTTP range requests: a stage's profile needs them all, its download only its own shards."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=settings.endpoint, token=settings.token)
    for file in weight_files(folder):
        cached = header_cache(folder, file)
        if (folder / file).is_file() or cached.is_file():
            continue
        if settings.offline:
            raise HubUnreachable(f"HF_HUB_OFFLINE is set and the header of {file} of '{repo_id}' is not in the "
                                 "local cache; unset it to read it from the Hub")
        meta = api.parse_safetensors_file_metadata(repo_id, file, revision=folder.name)
        header = {name: {"dtype": t.dtype, "shape": list(t.shape)} for name, t in meta.tensors.items()}
        _write_atomic(cached, json.dumps(header).encode())


def header_cache(folder: Path, file: str) -> Path:
    """Where the header of a shard of an HF cache snapshot is kept while the shard is not downloaded."""
    folder = Path(folder)
    return folder.parent.parent / HEADERS_DIR / folder.name / f"{file}.json"


def safetensors_header(folder: Path, file: str) -> dict[str, dict]:
    """Tensor name -> {"dtype": "BF16", "shape": [...]} of one safetensors file of ``folder``: read
    from the file, or from the cached Hub header of a shard this stage did not download."""
    path = Path(folder) / file
    if path.is_file():
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        return header
    cached = header_cache(folder, file)
    if cached.is_file():
        return json.loads(cached.read_text())
    raise ModelNotFound(f"{path} does not exist (and its header was never fetched from the Hub)")


def _download(repo_id: str, revision: str | None, settings: HubSettings, patterns: list[str],
              bars: bool = True) -> Path:
    """snapshot_download of the files matching ``patterns``; progress bars only for weights (``bars``)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, endpoint=settings.endpoint,
                                  token=settings.token, local_files_only=settings.offline,
                                  tqdm_class=None if bars else _quiet_bar()))


def _quiet_bar() -> type:
    """huggingface_hub's tqdm, never shown (config and tokenizer files: a bar would be noise)."""
    from huggingface_hub.utils import tqdm

    class QuietBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return QuietBar


def _download_file(repo_id: str, commit: str, file: str, settings: HubSettings, bar) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, file, revision=commit, endpoint=settings.endpoint, token=settings.token,
                                local_files_only=settings.offline, tqdm_class=bar))


def _in_repo(repo_id: str, folder: Path, file: str) -> bool:
    """Whether the snapshot's file listing (cached by huggingface_hub) has ``file``; True when unknown."""
    sizes = _sizes(repo_id, folder)
    return not sizes or file in sizes


def _sizes(repo_id: str, folder: Path) -> dict[str, int]:
    """File -> bytes from the tree listing huggingface_hub cached for this commit ({} when it has none)."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        tree = get_cached_repo_tree(repo_id, revision=folder.name, cache_dir=folder.parent.parent.parent)
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return {}
    return {f.path: f.size for f in tree}


def _quiet_http_logs() -> None:
    """huggingface_hub's HTTP client logs every request at INFO: keep a command's log to what it does
    (unless someone set those loggers' levels on purpose)."""
    for name in ("httpx", "httpx2"):
        http_log = logging.getLogger(name)
        if http_log.level == logging.NOTSET:
            http_log.setLevel(logging.WARNING)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Counter:
    """Bytes downloaded of a known total, told to a :data:`Progress` callback as they arrive."""

    def __init__(self, total: int, progress: Progress | None):
        self.total, self.done, self.progress = total, 0, progress
        self._lock = threading.Lock()
        self._told = -1.0

    def add(self, n: float) -> None:
        with self._lock:
            self.done += int(n)
            fraction = min(1.0, self.done / self.total) if self.total else 0.0
            if self.progress is not None and fraction - self._told >= 0.005:
                self._told = fraction
                self.progress(fraction)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(1.0)

    def bar_class(self) -> type:
        """huggingface_hub's tqdm (the terminal bar, hidden off a TTY) that also counts here."""
        from huggingface_hub.utils import tqdm

        counter = self

        class CountingBar(tqdm):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                counter.add(kwargs.get("initial") or 0)  # a resumed download's bytes already there

            def update(self, n: float | None = 1):
                counter.add(n or 0)
                return super().update(n)

        return CountingBar


# --------------------------------------------------------------------------- errors


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None, settings: HubSettings) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line errors (exit 2) that say what to do."""
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = f"'{repo_id}'" + (f" (revision {revision})" if revision else "")
    try:
        yield
    except GatedRepoError:  # a RepositoryNotFoundError too: first
        fix = "your HF_TOKEN has no access to it" if _has_token(settings) else "set HF_TOKEN to a token that has access"
        raise GatedModel(f"model {where} is gated: accept its terms at {settings.endpoint}/{repo_id} and {fix}") from None
    except RevisionNotFoundError:
        raise ModelNotFound(f"model '{repo_id}' has no revision '{revision}' on {settings.endpoint}") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"model '{repo_id}' is not on {settings.endpoint} (a private repo needs HF_TOKEN); pass an "
                            "HF id, a local HF folder or a .gguf file") from None
    except RemoteEntryNotFoundError as exc:
        raise ModelNotFound(f"model {where} lacks a file: {_first_line(exc)}") from None
    except HFValidationError as exc:
        raise ModelNotFound(f"'{repo_id}' is not in the local Hugging Face cache and is not a valid Hugging Face id "
                            f"({_first_line(exc)}); pass a local HF folder or a .gguf file") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise _unreachable(where, settings, exc) from None
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code in (401, 403):
            raise GatedModel(f"{settings.endpoint} refused model {where} ({exc.response.status_code}): set HF_TOKEN "
                             "to a token that has access") from None
        raise HubUnreachable(f"{settings.endpoint} failed for model {where}: {_first_line(exc)}") from None
    except OSError as exc:  # httpx connection errors that reach us unwrapped
        if type(exc).__module__.startswith("httpx"):
            raise _unreachable(where, settings, exc) from None
        raise


def _unreachable(where: str, settings: HubSettings, exc: BaseException) -> HubUnreachable:
    if settings.offline:
        return HubUnreachable(f"model {where} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
                              "(downloads are disabled); unset it, or pass a local HF folder or a .gguf file")
    cause = exc.__cause__ or exc.__context__
    reason = f"{type(cause).__name__}" if cause is not None else _first_line(exc)
    return HubUnreachable(f"cannot reach {settings.endpoint} ({reason}) and model {where} is not in the local "
                          "Hugging Face cache; check the network or HF_ENDPOINT, or pass a local HF folder or a .gguf file")


def _has_token(settings: HubSettings) -> bool:
    from huggingface_hub import get_token

    return bool(settings.token or get_token())


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
