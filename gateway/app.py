"""The gateway's OpenAI-compatible HTTP API, on top of a :class:`~parallax.gateway.pipeline.Pipeline`.

``create_app`` builds a FastAPI app serving ``/v1/chat/completions``, ``/v1/completions`` (both
streaming over SSE or not), ``/v1/requests/{id}/abort``, ``/v1/models`` and ``/health``. A request
past its deadline (``timeout`` in its body, else the gateway's default) is cancelled in the pipeline. Every error leaves as OpenAI error JSON
(``{"error": {"message", "type", "param", "code"}}``), never as a traceback. The pipeline iterator
of a request is always closed (``aclose()``): when it finishes, when a stop string is hit, on an
error and when a streaming client goes away, so that the stages release the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from abc import ABC, abstractmethod
from typing import Any, ClassVar, cast

import anyio
import anyio.lowlevel
import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from transformers import PreTrainedTokenizerBase

from parallax.broker.errors import (
    ChainUnavailable, GrammarError, ParallaxError, RequestCancelled, RequestTimedOut, StageFailed,
)
from parallax.broker.wire import Grammar, SamplingParams, TokenOut

from .detok import IncrementalDetokenizer, StopStrings
from . import structured
from .chat import encode_chat, template_text
from .metrics import GatewayMetrics, RequestTimer
from .pipeline import Pipeline
from .tools import ToolFormat, ToolStream, format_of, parse_all, tool_grammar
from .protocol import (
    AbortResult,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    FinishReason,
    GenerationRequest,
    Health,
    ModelCard,
    ModelList,
    Usage,
)

logger = logging.getLogger(__name__)

_DONE = "data: [DONE]\n\n"
_MAX_MESSAGE = 500


# ----------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error with its HTTP status, sent to the client as OpenAI error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "BadRequestError",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type_, param=param, code=code)
        self.headers = headers  # e.g. the `Allow` of a 405

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=self.info).model_dump(mode="json")
        return JSONResponse(body, status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        return f"data: {ErrorResponse(error=self.info).model_dump_json()}\n\n"


def _api_error(exc: Exception) -> APIError:
    """Map any exception to the error the client sees (internal details stay in the log)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ChainUnavailable):
        return APIError(503, str(exc), "ServiceUnavailableError", "chain_unavailable")
    if isinstance(exc, RequestTimedOut):
        return APIError(504, str(exc), "TimeoutError", "request_timeout")
    if isinstance(exc, RequestCancelled):
        return APIError(499, str(exc), "RequestAborted", "request_aborted")
    if isinstance(exc, StageFailed):
        return APIError(502, f"a pipeline stage failed: {exc}", "BadGatewayError", "stage_failed")
    if isinstance(exc, ParallaxError):
        return APIError(502, f"pipeline error: {exc}", "BadGatewayError", "pipeline_error")
    logger.error("unexpected error while serving a request", exc_info=exc)
    return APIError(
        500, f"internal server error ({type(exc).__name__})", "InternalServerError", "internal_error"
    )


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_MESSAGE else line[: _MAX_MESSAGE - 3] + "..."


def _validation_error(errors: Sequence[Any]) -> APIError:
    """A 400 naming every invalid field (pydantic's ``errors()`` of the request or its SamplingParams)."""
    parts: list[str] = []
    params: list[str] = []
    for err in errors:
        if err.get("type") == "json_invalid":
            reason = err.get("ctx", {}).get("error", "malformed JSON")
            return APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json")
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if not loc:
            return APIError(400, "the request body must be a JSON object", code="invalid_request")
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        part = f"{'.'.join(loc)}: {message}"
        if part not in parts:
            parts.append(part)
            params.append(loc[0])
    return APIError(
        400,
        _one_line("invalid request: " + "; ".join(parts)),
        code="invalid_request",
        param=params[0] if params else None,
    )


def _http_error(exc: StarletteHTTPException) -> APIError:
    kinds = {404: "NotFoundError", 405: "MethodNotAllowedError"}
    type_ = kinds.get(exc.status_code, "BadRequestError" if exc.status_code < 500 else "InternalServerError")
    return APIError(exc.status_code, str(exc.detail), type_, headers=exc.headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def on_validation(_: Request, exc: Exception) -> Response:
        return _validation_error(cast(RequestValidationError, exc).errors()).response()

    async def on_http(_: Request, exc: Exception) -> Response:
        return _http_error(cast(StarletteHTTPException, exc)).response()

    async def on_api(_: Request, exc: Exception) -> Response:
        return _api_error(exc).response()

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(APIError, on_api)
    app.add_exception_handler(ParallaxError, on_api)


class _CatchAll:
    """ASGI middleware: any unexpected exception becomes a 500 error JSON (traceback in the log)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except ClientDisconnect:
            logger.debug("client went away during %s", scope.get("path"))
        except Exception as exc:
            if started:
                raise
            await _api_error(exc).response()(scope, receive, send)


# ------------------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class _ModelInfo:
    name: str
    max_context: int
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class _Job:
    """A validated request, ready for the pipeline."""

    id: str
    model: str
    created: int
    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str]
    include_usage: bool
    timeout_s: float | None  # the request's deadline, from its arrival


@dataclass(frozen=True)
class _Delta:
    text: str
    finish: FinishReason | None = None


class _Generation:
    """One running request: pipeline tokens in, text deltas out, with stop strings applied."""

    def __init__(
        self, tokens: AsyncGenerator[TokenOut, None], job: _Job, tokenizer: PreTrainedTokenizerBase,
        timer: RequestTimer,
    ) -> None:
        self._tokens = tokens
        self._timer = timer
        self._finish: FinishReason | None = None
        self._params = job.params
        self._detok = IncrementalDetokenizer(tokenizer, job.prompt_ids)
        self._stops = StopStrings(job.stops)
        self._first: TokenOut | None = None
        self._closed = False
        self._deadline: asyncio.TimerHandle | None = None
        self.completion_tokens = 0

    @classmethod
    async def start(cls, pipeline: Pipeline, job: _Job, tokenizer: PreTrainedTokenizerBase,
                    metrics: GatewayMetrics) -> _Generation:
        """Start the request and wait for its first token, so that early errors become HTTP errors."""
        tokens = cast(AsyncGenerator[TokenOut, None], pipeline.generate(job.id, job.prompt_ids, job.params))
        generation = cls(tokens, job, tokenizer, metrics.request(len(job.prompt_ids)))
        if job.timeout_s is not None:
            error = RequestTimedOut(f"request {job.id} ran past its timeout of {job.timeout_s:g} s")
            generation._deadline = asyncio.get_running_loop().call_later(job.timeout_s, pipeline.cancel, job.id, error)
        try:
            generation._first = await anext(tokens, None)
            generation._arrived(generation._first)
        except BaseException:
            await generation.close()
            raise
        return generation

    async def deltas(self) -> AsyncIterator[_Delta]:
        """Text deltas; the last one has ``finish`` set. The pipeline is closed before it is yielded."""
        token = self._first
        while token is not None:
            delta = self._step(token)
            if delta.finish is not None:
                self._finish = delta.finish
                await self.close()
                yield delta
                return
            if delta.text:
                yield delta
            token = await self._next()
        self._finish = "stop"
        await self.close()  # the pipeline ended without a finish flag: treat it as a stop
        yield _Delta(self._stops.feed(self._detok.flush(), final=True)[0], "stop")

    async def _next(self) -> TokenOut | None:
        # Shielded: a client disconnect must not cancel the pipeline's iterator mid-await (its cleanup
        # could then not publish the release); the cancellation lands at the next yield instead, and
        # the iterator is closed with aclose(). The pipeline never hangs, so this wait is bounded.
        with anyio.CancelScope(shield=True):
            token = await anext(self._tokens, None)
            self._arrived(token)
        await anyio.lowlevel.checkpoint()  # deliver a cancellation that arrived while shielded
        return token

    def _arrived(self, token: TokenOut | None) -> None:
        if token is not None:
            self._timer.token()

    def _step(self, token: TokenOut) -> _Delta:
        """The stage decides ``finish`` (stop token, max_tokens, context); the gateway adds only
        stop strings, which it alone sees, and only once min_tokens allow a stop."""
        self.completion_tokens += 1
        finish = token.finish
        text = self._detok.add(token.token)
        if finish is not None:
            text += self._detok.flush()
        match = self._params.can_stop(self.completion_tokens)
        text, hit = self._stops.feed(text, final=finish is not None, match=match)
        return _Delta(text, "stop" if hit else finish)

    async def close(self) -> None:
        """Close the pipeline iterator (idempotent, and not cancellable: the stages must hear it)."""
        if self._closed:
            return
        self._closed = True
        self._timer.end(self._finish)
        if self._deadline is not None:
            self._deadline.cancel()
        with anyio.CancelScope(shield=True):
            try:
                await self._tokens.aclose()
            except Exception:
                logger.exception("closing the pipeline stream of a request failed")


# ----------------------------------------------------------------------------------------- format
class _Format(ABC):
    """How one endpoint shapes its streamed chunks and its complete response."""

    _chunk_type: ClassVar[type[ChatCompletionChunk] | type[CompletionChunk]]

    def __init__(self, job: _Job) -> None:
        self._job = job

    def _head(self) -> dict[str, Any]:
        return {"id": self._job.id, "created": self._job.created, "model": self._job.model}

    def _chunk(self, choices: list[Any], usage: Usage | None = None) -> str:
        return self._chunk_type(**self._head(), choices=choices, usage=usage).sse()

    def opening(self) -> list[str]:
        return []

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage)

    @abstractmethod
    def text(self, text: str) -> str: ...

    @abstractmethod
    def finish(self, reason: FinishReason) -> str: ...

    @abstractmethod
    def complete(self, text: str, reason: FinishReason, usage: Usage) -> BaseModel: ...


class _ChatFormat(_Format):
    """Chat chunks; with ``tools`` (the template's call format) the text is parsed into tool calls."""

    _chunk_type = ChatCompletionChunk

    def __init__(self, job: _Job, tools: ToolFormat | None = None, parallel: bool = True) -> None:
        super().__init__(job)
        self._tools, self._parallel = tools, parallel
        self._stream = ToolStream(tools, parallel) if tools is not None else None

    def opening(self) -> list[str]:
        return [self._chunk([ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))])]

    def text(self, text: str) -> str:
        text = self._stream.feed(text) if self._stream is not None else text
        return self._chunk([ChatChunkChoice(delta=DeltaMessage(content=text))]) if text else ""

    def finish(self, reason: FinishReason) -> str:
        chunks = ""
        if self._stream is not None:
            rest = self._stream.finish()
            chunks = self._chunk([ChatChunkChoice(delta=DeltaMessage(content=rest.content))]) if rest.content else ""
            if rest.calls:
                chunks += self._chunk([ChatChunkChoice(delta=DeltaMessage(tool_calls=rest.calls))])
                reason = "tool_calls"
        return chunks + self._chunk([ChatChunkChoice(delta=DeltaMessage(), finish_reason=reason)])

    def complete(self, text: str, reason: FinishReason, usage: Usage) -> BaseModel:
        message = AssistantMessage(content=text)
        if self._tools is not None:
            parsed = parse_all(self._tools, text, self._parallel)
            if parsed.calls:
                message = AssistantMessage(content=parsed.content or None, tool_calls=parsed.calls)
                reason = "tool_calls"
        choice = ChatChoice(message=message, finish_reason=reason)
        return ChatCompletion(**self._head(), choices=[choice], usage=usage)


class _CompletionFormat(_Format):
    _chunk_type = CompletionChunk

    def text(self, text: str) -> str:
        return self._chunk([CompletionChoice(text=text)])

    def finish(self, reason: FinishReason) -> str:
        return self._chunk([CompletionChoice(text="", finish_reason=reason)])

    def complete(self, text: str, reason: FinishReason, usage: Usage) -> BaseModel:
        choice = CompletionChoice(text=text, finish_reason=reason)
        return Completion(**self._head(), choices=[choice], usage=usage)


class _EventStream(StreamingResponse):
    """SSE response that closes its event generator however the response ends (disconnect too)."""

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()


async def _events(generation: _Generation, fmt: _Format, job: _Job) -> AsyncGenerator[str, None]:
    try:
        for chunk in fmt.opening():
            yield chunk
        async for delta in generation.deltas():
            if delta.text and (chunk := fmt.text(delta.text)):
                yield chunk
            if delta.finish is not None:
                yield fmt.finish(delta.finish)
        if job.include_usage:
            yield fmt.usage(Usage.of(len(job.prompt_ids), generation.completion_tokens))
    except Exception as exc:
        yield _api_error(exc).sse()
    finally:
        await generation.close()
    yield _DONE


# ---------------------------------------------------------------------------------------- gateway
class _Gateway:
    def __init__(self, pipeline: Pipeline, tokenizer: PreTrainedTokenizerBase, model: _ModelInfo,
                 request_timeout_s: float | None, metrics: GatewayMetrics) -> None:
        self._pipeline = pipeline
        self._metrics = metrics
        self._tokenizer = tokenizer
        self._model = model
        self._request_timeout_s = request_timeout_s

    # ---- endpoints
    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        self._check_model(body.model)
        tools = self._tool_format(body)
        prompt_ids = await run_in_threadpool(self._encode_chat, body)
        job = self._job(body, prompt_ids, "chatcmpl", "messages", await self._grammar(body, tools))
        return await self._serve(job, _ChatFormat(job, tools, body.parallel_tool_calls is not False), body.stream)

    async def completions(self, body: CompletionRequest) -> Response:
        self._check_model(body.model)
        prompt_ids = await run_in_threadpool(self._encode_prompt, body.prompt_value())
        job = self._job(body, prompt_ids, "cmpl", "prompt", await self._grammar(body))
        return await self._serve(job, _CompletionFormat(job), body.stream)

    async def abort(self, request_id: str) -> Response:
        """End a running request (the ``id`` its response carries): every stage frees its KV now and
        its client gets a ``request_aborted`` error (an SSE error event when streaming)."""
        if not self._pipeline.cancel(request_id, RequestCancelled(f"request {request_id} was aborted")):
            message = f"no running request `{request_id}` on this gateway"
            raise APIError(404, message, "NotFoundError", "request_not_found", "request_id")
        return JSONResponse(AbortResult(id=request_id).model_dump(mode="json"))

    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self._model.name, max_model_len=self._model.max_context)])

    async def health(self) -> Response:
        missing = self._pipeline.missing()
        if missing:
            return _api_error(ChainUnavailable(self._model.name, missing)).response()
        return JSONResponse(Health().model_dump(mode="json"))

    # ---- request -> job
    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self._model.name:
            message = f"The model `{name}` does not exist; this gateway serves `{self._model.name}`."
            raise APIError(404, message, "NotFoundError", "model_not_found", "model")

    def _tool_format(self, body: ChatCompletionRequest) -> ToolFormat | None:
        """The call format of the template when the request uses tools (None: no tools, or tool_choice none)."""
        try:
            if body.template_tools() is None:
                return None
        except GrammarError as exc:
            raise APIError(400, str(exc), param="tool_choice") from None
        fmt = format_of(template_text(self._tokenizer))
        if fmt is None:
            raise APIError(400, f"the chat template of `{self._model.name}` does not take tools", param="tools")
        return fmt

    def _encode_chat(self, body: ChatCompletionRequest) -> list[int]:
        try:
            return encode_chat(self._tokenizer, body.messages, body.template_tools())
        except jinja2.TemplateError as exc:
            raise APIError(400, _one_line(f"cannot apply the chat template: {exc}"), param="messages") from None

    def _encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self._tokenizer.encode(prompt))
        vocab = len(self._tokenizer)
        bad = [t for t in prompt if t >= vocab]
        if bad:
            message = f"token id {bad[0]} in the prompt is outside the vocabulary (0..{vocab - 1})"
            raise APIError(400, message, code="invalid_token_id", param="prompt")
        return list(prompt)

    @staticmethod
    async def _grammar(req: GenerationRequest, tools: ToolFormat | None = None) -> Grammar | None:
        """The request's structured-output grammar (or its forced tool call's), checked (a 400 names
        what is wrong with it)."""
        try:
            grammar = req.grammar()
            if tools is not None and isinstance(req, ChatCompletionRequest):
                forced = await run_in_threadpool(tool_grammar, tools, req)
                if forced is not None and grammar is not None:
                    raise GrammarError("a required or named tool_choice cannot be combined with structured outputs")
                grammar = grammar or forced
            if grammar is None:
                return None
            if req.min_tokens:
                raise GrammarError("min_tokens cannot be combined with structured outputs")
            return await run_in_threadpool(structured.check, grammar)
        except GrammarError as exc:
            raise APIError(400, _one_line(str(exc)), code="invalid_grammar") from None

    def _job(self, req: GenerationRequest, prompt_ids: list[int], prefix: str, prompt_param: str,
             grammar: Grammar | None = None) -> _Job:
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param=prompt_param)
        max_tokens = self._max_tokens(len(prompt_ids), req.requested_max_tokens(), prompt_param)
        try:
            params = req.sampling(max_tokens, self._model.eos_token_ids)
        except ValidationError as exc:
            raise _validation_error(exc.errors()) from None
        if grammar is not None:
            params = params.model_copy(update={"grammar": grammar})
        return _Job(
            id=f"{prefix}-{uuid.uuid4().hex}",
            model=self._model.name,
            created=int(time.time()),
            prompt_ids=prompt_ids,
            params=params,
            stops=req.stop_strings(),
            include_usage=req.include_usage(),
            timeout_s=req.timeout or self._request_timeout_s,
        )

    def _max_tokens(self, prompt_len: int, requested: int | None, prompt_param: str) -> int:
        limit = self._model.max_context
        if prompt_len >= limit:
            message = (
                f"the prompt has {prompt_len} tokens but this model's maximum context length is "
                f"{limit} tokens, which leaves no room to generate"
            )
            raise APIError(400, message, code="context_length_exceeded", param=prompt_param)
        if requested is None:
            return limit - prompt_len  # vLLM: the rest of the context
        if prompt_len + requested > limit:
            message = (
                f"this model's maximum context length is {limit} tokens, but {prompt_len + requested} "
                f"were requested ({prompt_len} in the prompt + {requested} max_tokens)"
            )
            raise APIError(400, message, code="context_length_exceeded", param="max_tokens")
        return requested

    # ---- job -> response
    async def _serve(self, job: _Job, fmt: _Format, stream: bool) -> Response:
        generation = await _Generation.start(self._pipeline, job, self._tokenizer, self._metrics)
        if stream:
            return _EventStream(_events(generation, fmt, job))
        pieces: list[str] = []
        reason: FinishReason = "stop"
        try:
            async for delta in generation.deltas():
                pieces.append(delta.text)
                reason = delta.finish or reason
        finally:
            await generation.close()
        usage = Usage.of(len(job.prompt_ids), generation.completion_tokens)
        return JSONResponse(fmt.complete("".join(pieces), reason, usage).model_dump(mode="json"))


def create_app(
    pipeline: Pipeline,
    tokenizer: PreTrainedTokenizerBase,
    model_name: str,
    max_context: int,
    eos_token_ids: list[int],
    request_timeout_s: float | None = None,
) -> FastAPI:
    """The OpenAI-compatible HTTP app of a gateway serving ``model_name`` through ``pipeline``;
    ``request_timeout_s``: the deadline of a request that sends no ``timeout`` (None: none)."""
    if request_timeout_s is not None and not request_timeout_s > 0:
        raise ValueError(f"request_timeout_s must be positive, got {request_timeout_s}")
    model = _ModelInfo(model_name, max_context, tuple(eos_token_ids))
    metrics = GatewayMetrics(model_name)
    gateway = _Gateway(pipeline, tokenizer, model, request_timeout_s, metrics)
    app = FastAPI(title="Parallax-NATS gateway")
    app.state.metrics = metrics  # /metrics (gateway/watch.py) serves it
    app.add_middleware(_CatchAll)
    _install_error_handlers(app)
    generation = (400, 404, 499, 502, 503, 504)
    app.add_api_route("/v1/chat/completions", gateway.chat_completions, methods=["POST"], response_model=None,
                      responses=_documented(ChatCompletion, generation))
    app.add_api_route("/v1/completions", gateway.completions, methods=["POST"], response_model=None,
                      responses=_documented(Completion, generation))
    app.add_api_route("/v1/requests/{request_id}/abort", gateway.abort, methods=["POST"], response_model=None,
                      responses=_documented(AbortResult, (404,)))
    app.add_api_route("/v1/models", gateway.models, methods=["GET"])
    app.add_api_route("/health", gateway.health, methods=["GET"], response_model=None,
                      responses=_documented(Health, (503,)))
    app.openapi = _without_422(app.openapi)
    return app


# ---------------------------------------------------------------------------------------- OpenAPI
_ERRORS = {
    400: "invalid request: a bad field, an unknown token id, a prompt too long for the context",
    404: "unknown model, or no such running request",
    499: "the request was aborted (POST /v1/requests/{id}/abort)",
    502: "a pipeline stage failed",
    503: "no complete chain of stages serves the model",
    504: "the request ran past its timeout",
}


def _documented(ok: type[BaseModel], errors: Sequence[int]) -> dict[int | str, dict[str, Any]]:
    """The responses of a route for /openapi.json: ``ok`` on 200 (JSON, or SSE events when the body
    asks for ``stream``) and OpenAI error JSON for each of ``errors``."""
    responses: dict[int | str, dict[str, Any]] = {200: {"model": ok}}
    if ok in (ChatCompletion, Completion):
        responses[200]["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
    return responses | {code: {"model": ErrorResponse, "description": _ERRORS[code]} for code in errors}


def _without_422(generate: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """FastAPI documents a 422 for every route with a body or parameters; invalid requests get a 400
    here (OpenAI's status), documented with each route."""

    def openapi() -> dict[str, Any]:
        schema = generate()
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        return schema

    return openapi
