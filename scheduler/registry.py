"""Live view of the stages serving each model, fed by heartbeats (no torch here).

A stage publishes its :class:`NodeInfo` every ``interval`` seconds on ``parallax.heartbeat.<model>.<node>``
and answers ``parallax.discover``; a node unseen for ``ttl`` seconds, or one that said ``leaving``, is gone.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TTL_S = 3.5


class NodeInfo(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    node_id: str
    model: str
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    num_layers: int = Field(ge=1)
    host: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    version: str = ""
    state: Literal["serving", "leaving"] = "serving"
    running: int = 0  # requests with state on this stage
    queued: int = 0  # messages waiting for the engine


class Registry:
    def __init__(self, ttl_s: float = HEARTBEAT_TTL_S):
        self.ttl_s = ttl_s
        self._nodes: dict[str, tuple[float, NodeInfo]] = {}

    def update(self, info: NodeInfo, now: float | None = None) -> None:
        if info.state == "leaving":
            self._nodes.pop(info.node_id, None)
        else:
            self._nodes[info.node_id] = (time.monotonic() if now is None else now, info)

    def nodes(self, model: str | None = None, now: float | None = None) -> list[NodeInfo]:
        now = time.monotonic() if now is None else now
        for node_id in [k for k, (seen, _) in self._nodes.items() if now - seen > self.ttl_s]:
            del self._nodes[node_id]
        return [info for _, info in self._nodes.values() if model is None or info.model == model]
