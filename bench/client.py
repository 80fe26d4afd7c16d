"""Streaming ``/v1/completions`` client (httpx, SSE parsed by hand) and a concurrency-limited runner."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import orjson

from bench.stats import RequestRecord

REQUEST_TIMEOUT_S = 900.0


def make_http_client(base_url: str, concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout)


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


async def stream_completion(http: httpx.AsyncClient, body: dict[str, Any]) -> RequestRecord:
    """One streamed request; failures end up in ``record.error``, never as exceptions."""
    record = RequestRecord(start=time.perf_counter())
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {text[:200]}"
            else:
                async for line in response.aiter_lines():
                    if line.startswith("data:") and apply_event(record, line[5:].strip(), time.perf_counter()):
                        break
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:200]
    record.end = time.perf_counter()
    if record.error is None and not record.chunk_times:
        record.error = "no tokens streamed"
    return record


async def run_requests(
    http: httpx.AsyncClient,
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


async def served_model(http: httpx.AsyncClient) -> str | None:
    """The first model id of ``GET /v1/models`` (None if the gateway does not say)."""
    try:
        response = await http.get("/v1/models")
        data = response.json().get("data") or []
        return str(data[0]["id"]) if data else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
