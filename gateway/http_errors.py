"""Every error of the gateway's HTTP API as OpenAI error JSON (``{"error": {"message", "type", "param",
"code"}}``), never as a traceback: :class:`APIError`, the mapping of pipeline errors, the handlers of
FastAPI's own errors and a catch-all middleware."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parallax.broker.errors import ChainUnavailable, ParallaxError, RequestCancelled, RequestTimedOut, StageFailed

from .protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)
_MAX_MESSAGE = 500


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


def api_error(exc: Exception) -> APIError:
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


def one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_MESSAGE else line[: _MAX_MESSAGE - 3] + "..."


def validation_error(errors: Sequence[Any]) -> APIError:
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
        one_line("invalid request: " + "; ".join(parts)),
        code="invalid_request",
        param=params[0] if params else None,
    )


def _http_error(exc: StarletteHTTPException) -> APIError:
    kinds = {404: "NotFoundError", 405: "MethodNotAllowedError"}
    type_ = kinds.get(exc.status_code, "BadRequestError" if exc.status_code < 500 else "InternalServerError")
    return APIError(exc.status_code, str(exc.detail), type_, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation(_: Request, exc: Exception) -> Response:
        return validation_error(cast(RequestValidationError, exc).errors()).response()

    async def on_http(_: Request, exc: Exception) -> Response:
        return _http_error(cast(StarletteHTTPException, exc)).response()

    async def on_api(_: Request, exc: Exception) -> Response:
        return api_error(exc).response()

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(APIError, on_api)
    app.add_exception_handler(ParallaxError, on_api)


class CatchAll:
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
            await api_error(exc).response()(scope, receive, send)
