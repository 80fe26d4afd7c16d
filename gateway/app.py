"""The gateway's OpenAI-compatible HTTP API, on top of a :class:`~parallax.gateway.pipeline.Pipeline`.

``create_app`` builds a FastAPI app serving ``/v1/chat/completions``, ``/v1/completions`` (both
streaming over SSE or not), ``/v1/requests/{id}/abort``, ``/v1/models`` and ``/health``. A request
past its deadline (``timeout`` in its body, else the gateway's default) is cancelled in the pipeline.
Every error leaves as OpenAI error JSON (:mod:`.http_errors`), never as a traceback. A request runs
as ``n`` choices (:mod:`.generation`), shaped by its endpoint's format (:mod:`.formats`). The pipeline
iterator of every choice is always closed (``aclose()``): when it finishes, when a stop string is
hit, on an error and when a streaming client goes away, so that the stages release the request.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from transformers import PreTrainedTokenizerBase

from parallax.broker.errors import ChainUnavailable, GrammarError, RequestCancelled
from parallax.broker.wire import Grammar

from . import structured
from .chat import encode_chat, template_text
from .formats import ChatFormat, CompletionFormat, EventStream, Format, TokenNames, collect, events
from .generation import Job, choice_rids, start_choices
from .metrics import GatewayMetrics
from .http_errors import APIError, CatchAll, api_error, install_error_handlers, one_line, validation_error
from .pipeline import Pipeline
from .protocol import (
    AbortResult,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    GenerationRequest,
    Health,
    ModelCard,
    ModelList,
)
from .tools import ToolFormat, format_of, special_ids, tool_grammar


@dataclass(frozen=True)
class _ModelInfo:
    name: str
    max_context: int
    eos_token_ids: tuple[int, ...]


# ---------------------------------------------------------------------------------------- gateway
class _Gateway:
    def __init__(self, pipeline: Pipeline, tokenizer: PreTrainedTokenizerBase, model: _ModelInfo,
                 request_timeout_s: float | None, metrics: GatewayMetrics) -> None:
        self._pipeline = pipeline
        self._metrics = metrics
        self._tokenizer = tokenizer
        self._model = model
        self._request_timeout_s = request_timeout_s
        self._names = TokenNames(tokenizer)

    # ---- endpoints
    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        self._check_model(body.model)
        tools = self._tool_format(body)
        prompt_ids = await run_in_threadpool(self._encode_chat, body)
        job = self._job(body, prompt_ids, "chatcmpl", "messages", grammar=await self._grammar(body, tools),
                        keep=special_ids(tools, self._tokenizer) if tools is not None else frozenset())
        fmt = ChatFormat(job, self._names, tools, body.parallel_tool_calls is not False)
        return await self._serve(job, fmt, body.stream)

    async def completions(self, body: CompletionRequest) -> Response:
        self._check_model(body.model)
        prompt = body.prompt_value()
        prompt_ids = await run_in_threadpool(self._encode_prompt, prompt)
        echo = (prompt if isinstance(prompt, str) else self._decode(prompt_ids)) if body.echo else ""
        job = self._job(body, prompt_ids, "cmpl", "prompt", echo, await self._grammar(body))
        return await self._serve(job, CompletionFormat(job, self._names, body.prompt_logprobs), body.stream)

    async def abort(self, request_id: str) -> Response:
        """End a running request (the ``id`` its response carries): every stage frees its KV now and
        its client gets a ``request_aborted`` error (an SSE error event when streaming); all its choices."""
        error = RequestCancelled(f"request {request_id} was aborted")
        if not any([self._pipeline.cancel(rid, error) for rid in choice_rids(request_id)]):
            message = f"no running request `{request_id}` on this gateway"
            raise APIError(404, message, "NotFoundError", "request_not_found", "request_id")
        return JSONResponse(AbortResult(id=request_id).model_dump(mode="json"))

    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self._model.name, max_model_len=self._model.max_context)])

    async def health(self) -> Response:
        missing = self._pipeline.missing()
        if missing:
            return api_error(ChainUnavailable(self._model.name, missing)).response()
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
            raise APIError(400, one_line(f"cannot apply the chat template: {exc}"), param="messages") from None

    def _encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self._tokenizer.encode(prompt))
        vocab = len(self._tokenizer)
        bad = [t for t in prompt if t >= vocab]
        if bad:
            message = f"token id {bad[0]} in the prompt is outside the vocabulary (0..{vocab - 1})"
            raise APIError(400, message, code="invalid_token_id", param="prompt")
        return list(prompt)

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))

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
            raise APIError(400, one_line(str(exc)), code="invalid_grammar") from None

    def _job(self, req: GenerationRequest, prompt_ids: list[int], prefix: str, prompt_param: str, echo: str = "",
             grammar: Grammar | None = None, keep: frozenset[int] = frozenset()) -> Job:
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param=prompt_param)
        vocab = len(self._tokenizer)
        if bad := [t for t in req.logit_bias or () if t >= vocab]:
            message = f"token id {bad[0]} in logit_bias is outside the vocabulary (0..{vocab - 1})"
            raise APIError(400, message, code="invalid_token_id", param="logit_bias")
        max_tokens = self._max_tokens(len(prompt_ids), req.requested_max_tokens(), prompt_param)
        try:
            params = req.sampling(max_tokens, self._model.eos_token_ids)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        if grammar is not None:
            params = params.model_copy(update={"grammar": grammar})
        return Job(
            id=f"{prefix}-{uuid.uuid4().hex}",
            model=self._model.name,
            created=int(time.time()),
            prompt_ids=prompt_ids,
            params=params,
            stops=req.stop_strings(),
            include_usage=req.include_usage(),
            timeout_s=req.timeout or self._request_timeout_s,
            n=req.n,
            echo=echo,
            keep=keep,
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
    async def _serve(self, job: Job, fmt: Format, stream: bool) -> Response:
        generations = await start_choices(self._pipeline, job, self._tokenizer, self._metrics)
        if stream:
            return EventStream(events(generations, fmt, job))
        return JSONResponse((await collect(generations, fmt, job)).model_dump(mode="json"))


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
    app.add_middleware(CatchAll)
    install_error_handlers(app)
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


# one server-sent event (OpenAPI 3.0/3.1 tools read a text/event-stream ``schema`` per event): ``data`` is a
# chunk's JSON, an error's JSON, or ``[DONE]``
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                             "retry": {"type": "integer"}}}


def _documented(ok: type[BaseModel], errors: Sequence[int]) -> dict[int | str, dict[str, Any]]:
    """The responses of a route for /openapi.json: ``ok`` on 200 (JSON, or SSE events when the body
    asks for ``stream``) and OpenAI error JSON for each of ``errors``."""
    responses: dict[int | str, dict[str, Any]] = {200: {"model": ok}}
    if ok in (ChatCompletion, Completion):
        responses[200]["content"] = {"text/event-stream": {"schema": _SSE_EVENT}}
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
