"""Streaming ``/v1/completions`` client (aiohttp, SSE parsed by hand) and a concurrency-limited runner.

aiohttp, not httpx: on a 2-core machine the client shares the cores with the server it measures, and its C HTTP
parser costs ~0.2 ms of CPU a streamed token where httpx (h11, pure Python) cost ~0.6, as much as the gateway
itself (one SmolLM2 stream, 2-core AMD EPYC; the single-stream figures were ~5 % lower with httpx)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import orjson

from bench.stats import RequestRecord

REQUEST_TIMEOUT_S = 900.0


def make_http_client(base_url: str, concurrency: int) -> aiohttp.ClientSession:
    """A session for ``concurrency`` streams (used as ``async with``); paths are relative to ``base_url``."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, connect=10.0)
    return aiohttp.ClientSession(base_url=base_url, connector=aiohttp.TCPConnector(limit=concurrency + 8), timeout=timeout)


def completion_body(model: str | None, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """Greedy, exactly ``max_tokens`` tokens (``ignore_eos``), streamed with a final usage chunk."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model is not None:
        body["model"] = model
    return body


def apply_event(record: RequestRecord, data: str, now: float) -> bool:
    """Fold one SSE ``data:`` payload into ``record``; True at ``[DONE]``."""
    if data.strip() == "[DONE]":
        return True
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        record.error = f"bad SSE payload: {data[:80]!r}"
        return True
    if not isinstance(event, dict):
        return False
    if event.get("error"):
        error = event["error"]
        record.error = str(error.get("message", error) if isinstance(error, dict) else error)[:200]
        return True
    choices = event.get("choices") or []
    if choices and isinstance(choices[0], dict) and choices[0].get("text"):
        record.chunk_times.append(now)
    usage = event.get("usage")
    if isinstance(usage, dict):
        record.completion_tokens = usage.get("completion_tokens")
        record.prompt_tokens = usage.get("prompt_tokens")
    return False


async def stream_completion(http: aiohttp.ClientSession, body: dict[str, Any]) -> RequestRecord:
    """One streamed request; failures end up in ``record.error``, never as exceptions."""
    record = RequestRecord(start=time.perf_counter())
    try:
        async with http.post("/v1/completions", json=body) as response:
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                record.error = f"HTTP {response.status}: {text[:200]}"
            else:
                async for line in response.content:  # one line at a time
                    if line.startswith(b"data:") and apply_event(record, line[5:].decode().strip(), time.perf_counter()):
                        break
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:  # ValueError: a line over aiohttp's limit
        record.error = f"{type(exc).__name__}: {exc}"[:200]
    record.end = time.perf_counter()
    if record.error is None and not record.chunk_times:
        record.error = "no tokens streamed"
    return record


async def run_requests(
    http: aiohttp.ClientSession,
    model: str | None,
    prompts: Sequence[list[int]],
    max_tokens: int,
    concurrency: int,
    timeout_s: float | None = None,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """All prompts with at most ``concurrency`` in flight; returns the records and the wall time.
    Requests still unfinished ``timeout_s`` after the start are cancelled and count as failed;
    ``on_done`` sees every record as it finishes."""
    semaphore = asyncio.Semaphore(concurrency)
    started = time.perf_counter()
    deadline = None if timeout_s is None else started + timeout_s

    async def one(prompt: list[int]) -> RequestRecord:
        async with semaphore:
            record = await _within(stream_completion(http, completion_body(model, prompt, max_tokens)), deadline)
        if on_done is not None:
            on_done(record)
        return record

    records = await asyncio.gather(*(one(p) for p in prompts))
    return list(records), time.perf_counter() - started


async def _within(request: Awaitable[RequestRecord], deadline: float | None) -> RequestRecord:
    """The request's record, or a failed one when ``deadline`` (perf_counter) passes first."""
    if deadline is None:
        return await request
    try:
        return await asyncio.wait_for(request, max(0.0, deadline - time.perf_counter()))
    except asyncio.TimeoutError:
        now = time.perf_counter()
        return RequestRecord(start=now, end=now, error="timed out (phase deadline)")


async def served_model(http: aiohttp.ClientSession) -> str | None:
    """The first model id of ``GET /v1/models`` (None if the gateway does not say)."""
    try:
        async with http.get("/v1/models") as response:
            data = orjson.loads(await response.read()).get("data") or []
        return str(data[0]["id"]) if data else None
    except (aiohttp.ClientError, ValueError, KeyError, TypeError, AttributeError):
        return None
