"""The gateway's view of the cluster: a Pipeline turns prompt token ids into generated tokens.

``NatsPipeline`` (in :mod:`parallax.gateway.nats_pipeline`) is the real one. The HTTP layer only
depends on this Protocol.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from parallax.broker.errors import ParallaxError
from parallax.broker.wire import SamplingParams, TokenOut


class Pipeline(Protocol):
    def missing(self) -> list[tuple[int, int]]:
        """Layer ranges no live stage serves right now (empty when a full chain exists)."""
        ...

    def generate(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenOut]:
        """Stream the generated tokens of one request; the last one has ``finish`` set.

        Raises ``ChainUnavailable`` before the first token when no full chain exists and
        ``StageFailed`` when a stage errors, or vanishes and no replica takes over in time (within
        a bounded time, never a hang). Closing the iterator early (``aclose()``, e.g. a stop string
        or a client disconnect) releases the request on every stage.
        """
        ...

    def cancel(self, rid: str, error: ParallaxError) -> bool:
        """End the running request ``rid`` (an abort, a deadline): every stage releases it at once
        and its iterator raises ``error``. False when no request ``rid`` is running."""
        ...
