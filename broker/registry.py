"""What the cluster knows about its nodes (no torch, no NATS here).

Every stage, gateway and scheduler keeps a :class:`NodeInfo` under ``<kind>.<node_id>`` in the
JetStream KV bucket ``parallax-nodes`` (see :mod:`parallax.broker.kv`), rewritten every heartbeat with
a per-key TTL, deleted on a clean exit. The scheduler writes :class:`Assignment` values under
``assign.<node_id>``; a stage started without ``--layers`` watches its key and serves what it says.
:class:`Registry` is the live view a watcher builds from those keys.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

HEARTBEAT_INTERVAL_S = 1.0
KEY_TTL_S = 3  # server-side TTL of a node's key (whole seconds): gone this long after its last heartbeat
HEARTBEAT_TTL_S = 3.5  # a watcher's own check, in case an expiry marker is missed
# A dead node is noticed within this: the gateway fails the requests it was serving, a standby
# scheduler takes a dead leader's lock. Its last heartbeat (up to one interval before it died) + the
# TTL + one interval of slack for a busy machine. The README and the tests state this bound.
DEAD_NODE_NOTICED_S = KEY_TTL_S + 2 * HEARTBEAT_INTERVAL_S
DRAIN_TIMEOUT_S = 60.0  # SIGTERM: how long a stage with no replica lets its running requests finish
Kind = Literal["stage", "gateway", "scheduler"]
State = Literal["waiting", "loading", "serving", "leaving"]


class ModelProfile(BaseModel):
    """Sizes the scheduler needs to place a model's layers (computed by a stage from the checkpoint)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    num_layers: int = Field(ge=1)
    layer_bytes: int = Field(ge=0)  # weights of the largest decoder layer in the serving dtype
    first_bytes: int = Field(ge=0)  # embeddings: held by the node that serves layer 0
    last_bytes: int = Field(ge=0)  # final norm + lm_head: held by the node that serves the last layer
    kv_bytes_per_token: int = Field(ge=0)  # keys + values of one position in one layer
    # weights of each decoder layer (dense and mixture-of-experts layers differ); None (records written
    # before it existed): every layer ``layer_bytes``
    layer_bytes_list: tuple[Annotated[int, Field(ge=0)], ...] | None = None
    # each layer's sliding window (0: full attention), whose KV a stage keeps for at most that many positions
    # of a request; None: every layer attends to all positions
    kv_windows: tuple[Annotated[int, Field(ge=0)], ...] | None = None

    @model_validator(mode="after")
    def _per_layer(self) -> "ModelProfile":
        for name in ("layer_bytes_list", "kv_windows"):
            value = getattr(self, name)
            if value is not None and len(value) != self.num_layers:
                raise ValueError(f"{name} has {len(value)} entries for {self.num_layers} layers")
        return self

    def kv_reserve(self, tokens: int) -> tuple[int, ...]:
        """KV bytes of every decoder layer for ``tokens`` positions of a request: all of them in a full-attention
        layer, at most its window in a sliding one."""
        windows = self.kv_windows or (0,) * self.num_layers
        return tuple(self.kv_bytes_per_token * (min(tokens, w) if w else tokens) for w in windows)

    @property
    def per_layer(self) -> tuple[int, ...]:
        """Weights of every decoder layer, in order."""
        return self.layer_bytes_list or (self.layer_bytes,) * self.num_layers

    def range_bytes(self, start: int, end: int) -> int:
        """Weights a stage of layers ``start:end`` holds: its layers, plus the embeddings if it serves
        layer 0 and the final norm and head if it serves the last layer."""
        return (sum(self.per_layer[start:end]) + (self.first_bytes if start == 0 else 0)
                + (self.last_bytes if end == self.num_layers else 0))


class Load(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    running: int = 0  # requests with state (KV) on this stage
    waiting: int = 0  # requests or messages waiting for the engine
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0


class NodeInfo(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    node_id: str
    kind: Kind = "stage"
    model: str = ""
    start: int | None = Field(default=None, ge=0)  # layers served (half-open, global); None: none yet
    end: int | None = Field(default=None, ge=1)
    num_layers: int = Field(default=0, ge=0)
    host: str = ""
    backend: str = "torch"  # the stage's compute backend: "torch" or "mlx"
    device: str = "cpu"
    dtype: str = "float32"
    version: str = ""
    state: State = "serving"
    progress: float | None = Field(default=None, ge=0, le=1)  # while loading: the fraction of its weights downloaded
    manual: bool = False  # placed by hand (--layers): the scheduler plans around it
    memory_total: int = 0  # bytes of the device
    memory_offered: int = 0  # bytes this node may fill with weights + KV cache
    layer_ms: float | None = None  # decode time of one layer for one step, measured or estimated
    load: Load = Load()
    profile: ModelProfile | None = None
    kernels: dict[str, str] = {}  # projection (shape, format, row kind) -> the kernel measured fastest at load
    updated: float = 0.0  # sender's wall clock (for display only)

    @model_validator(mode="after")
    def _range(self) -> "NodeInfo":
        if (self.start is None) != (self.end is None):
            raise ValueError("start and end come together")
        if self.start is not None and not self.start < self.end:
            raise ValueError(f"empty layer range {self.start}:{self.end}")
        return self

    @property
    def layers(self) -> tuple[int, int] | None:
        return None if self.start is None else (self.start, self.end)

    @property
    def key(self) -> str:
        return node_key(self.kind, self.node_id)

    @property
    def serves(self) -> bool:
        return self.kind == "stage" and self.state == "serving" and self.start is not None


class Assignment(BaseModel):
    """The scheduler's word to one stage: serve ``start:end`` of ``model`` (plan ``epoch``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    node_id: str
    model: str
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    epoch: int = Field(default=0, ge=0)
    scheduler: str = ""

    @model_validator(mode="after")
    def _range(self) -> "Assignment":
        if not self.start < self.end:
            raise ValueError(f"empty layer range {self.start}:{self.end}")
        return self


LEADER_KEY = "leader"  # the leading scheduler's lock


def node_key(kind: str, node_id: str) -> str:
    return f"{kind}.{node_id}"


ASSIGN_PREFIX = "assign."  # the keys of the leading scheduler's assignments


def assign_key(node_id: str) -> str:
    return f"{ASSIGN_PREFIX}{node_id}"


class Registry:
    """Nodes by key, fed by KV entries; a node unseen for ``ttl_s``, deleted, or leaving is gone."""

    def __init__(self, ttl_s: float = HEARTBEAT_TTL_S):
        self.ttl_s = ttl_s
        self._nodes: dict[str, tuple[float, NodeInfo]] = {}

    def update(self, info: NodeInfo, now: float | None = None) -> None:
        if info.state == "leaving":
            self._nodes.pop(info.key, None)
        else:
            self._nodes[info.key] = (time.monotonic() if now is None else now, info)

    def remove(self, key: str) -> None:
        """Forget the node stored under ``key`` (``<kind>.<node_id>``)."""
        self._nodes.pop(key, None)

    def nodes(self, model: str | None = None, kind: Kind | None = "stage", now: float | None = None) -> list[NodeInfo]:
        now = time.monotonic() if now is None else now
        for node_id in [k for k, (seen, _) in self._nodes.items() if now - seen > self.ttl_s]:
            del self._nodes[node_id]
        return [info for _, info in self._nodes.values()
                if (model is None or info.model == model) and (kind is None or info.kind == kind)]

    def serving(self, model: str, now: float | None = None) -> list[NodeInfo]:
        """Stages of ``model`` serving a layer range now."""
        return [n for n in self.nodes(model, "stage", now) if n.serves]
