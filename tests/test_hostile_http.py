"""Hostile HTTP input: schemathesis against the gateway's own OpenAPI schema (FastAPI's /openapi.json).

The gateway app runs in process over ASGI, on a real NatsPipeline, a real nats-server and one real
stage (a tiny random Llama with SmolLM2's vocabulary and tokenizer). Every generated request, valid or
not, must get an answer the schema documents: no 5xx but the pipeline's own 502/503/504, no hang
(each call has a timeout), and every error an OpenAI error JSON.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from parallax.gateway.app import create_app
from parallax.gateway.protocol import ErrorResponse
from tests.cluster import cluster

pytestmark = pytest.mark.slow  # the gateway needs SmolLM2's tokenizer
LAYERS = 6
MAX_CONTEXT = 36  # short generations (a chat prompt is 30 tokens; no max_tokens: the rest of the context)
CALL_TIMEOUT_S = 60  # a hang fails the call (requests' ReadTimeout) instead of the suite's timeout


class LiveGateway:
    """The gateway app, with its cluster (one stage serving every layer, a NatsPipeline) started and
    stopped by the ASGI lifespan: schemathesis runs the lifespan and every request in one event loop."""

    def __init__(self, nats_url: str, model_dir, tokenizer) -> None:
        self.nats_url, self.model_dir, self.tokenizer = nats_url, model_dir, tokenizer
        self.app = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        await receive()  # lifespan.startup
        async with self._cluster():
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})

    @contextlib.asynccontextmanager
    async def _cluster(self) -> AsyncIterator[None]:
        async with cluster(self.nats_url, self.model_dir, "tiny", LAYERS, [(0, LAYERS)]) as c:
            eos = [self.tokenizer.eos_token_id]
            self.app = create_app(c.pipeline, self.tokenizer, "tiny", MAX_CONTEXT, eos)
            yield


@pytest.fixture
def gateway_schema(nats_module, tiny_model_dir, smollm2_tokenizer):
    return schemathesis.openapi.from_asgi("/openapi.json", LiveGateway(nats_module, tiny_model_dir, smollm2_tokenizer))


schema = schemathesis.pytest.from_fixture("gateway_schema")


def openai_errors_only(ctx, response, case) -> None:
    """Every error is OpenAI error JSON; the only 5xx is a request's own timeout (504): the chain is
    complete and its stage healthy, so a 502 or 503 is a bug too. A streamed answer is data events
    (chunks, or one error event last) ended by ``[DONE]`` (a stream cut at the call's timeout lacks it)."""
    content_type = response.headers.get("content-type", [""])[0]
    if content_type.startswith("text/event-stream"):
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
        assert events and events[-1] == "[DONE]", f"stream not ended by [DONE]: {response.text[-300:]!r}"
        bodies = [json.loads(e) for e in events[:-1]]
        for body in bodies[:-1]:
            assert "error" not in body, f"an error event before the end of the stream: {body}"
        if bodies and "error" in bodies[-1]:
            _check_error(504, ErrorResponse.model_validate(bodies[-1]))
        return
    if response.status_code >= 400:
        _check_error(response.status_code, ErrorResponse.model_validate_json(response.content))


def _check_error(status: int, error: ErrorResponse) -> None:
    if status >= 500:
        assert (status, error.error.code) == (504, "request_timeout"), f"server error {status}: {error}"


@schema.parametrize()
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
def test_gateway_schema(case):
    case.call_and_validate(timeout=CALL_TIMEOUT_S, excluded_checks=[not_a_server_error, positive_data_acceptance],
                           additional_checks=[openai_errors_only])
