"""What the planner takes and gives: model costs, node capacities, placements and plans."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import accumulate, pairwise

_EPS = 1e-9  # relative slack of every throughput comparison


@dataclass(frozen=True)
class ModelCost:
    """Sizes and costs of a model, as the planner needs them."""

    num_layers: int
    layer_bytes: int
    kv_reserve_bytes: int
    first_bytes: int = 0
    last_bytes: int = 0
    hop_ms: float = 1.0
    layer_bytes_list: tuple[int, ...] | None = None  # weights of each layer where they differ (None: layer_bytes each)
    kv_reserve_list: tuple[int, ...] | None = None  # KV reserve of each layer where they differ (None: kv_reserve_bytes)

    def __post_init__(self) -> None:
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"a model needs at least 1 layer, got {self.num_layers!r}")
        for name in ("layer_bytes", "kv_reserve_bytes", "first_bytes", "last_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not self.hop_ms >= 0:
            raise ValueError(f"hop_ms must be >= 0, got {self.hop_ms!r}")
        for name in ("layer_bytes_list", "kv_reserve_list"):
            if getattr(self, name) is not None:
                sizes = tuple(getattr(self, name))
                if len(sizes) != self.num_layers or not all(isinstance(v, int) and v >= 0 for v in sizes):
                    raise ValueError(f"{name} must hold {self.num_layers} integers >= 0, got {sizes!r}")
                object.__setattr__(self, name, sizes)

    @property
    def per_layer(self) -> int:
        """Bytes the largest served layer takes: weights plus its KV reserve."""
        return max(self.layer_costs)

    @property
    def layer_costs(self) -> tuple[int, ...]:
        """Bytes each served layer takes: its weights plus its KV reserve."""
        sizes = self.layer_bytes_list or (self.layer_bytes,) * self.num_layers
        reserves = self.kv_reserve_list or (self.kv_reserve_bytes,) * self.num_layers
        return tuple(size + kv for size, kv in zip(sizes, reserves))


@dataclass(frozen=True)
class NodeCapacity:
    """What one node offers: memory for weights + KV reserve, and its speed."""

    node_id: str
    memory: int
    layer_ms: float
    fixed: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise ValueError(f"node_id must be a non-empty string, got {self.node_id!r}")
        if not isinstance(self.memory, int) or self.memory < 0:
            raise ValueError(f"memory of {self.node_id} must be an integer >= 0, got {self.memory!r}")
        if not self.layer_ms > 0:
            raise ValueError(f"layer_ms of {self.node_id} must be > 0, got {self.layer_ms!r}")
        if self.fixed is not None:
            if len(self.fixed) != 2 or not all(isinstance(v, int) for v in self.fixed):
                raise ValueError(f"fixed range of {self.node_id} must be (start, end), got {self.fixed!r}")
            if not 0 <= self.fixed[0] < self.fixed[1]:
                raise ValueError(f"fixed range of {self.node_id} must satisfy 0 <= start < end, got {self.fixed!r}")
            object.__setattr__(self, "fixed", tuple(self.fixed))


@dataclass(frozen=True)
class Placement:
    """One node serving the half-open global layer range ``[start, end)``."""

    node_id: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"placement of {self.node_id} must satisfy 0 <= start < end, got {self.start}:{self.end}")

    @property
    def layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Plan:
    """Pipelines (each covering ``0..L`` once, in order), idle nodes, and the estimated tokens/s.

    ``partial``: fixed (hand-placed) nodes that are in no complete pipeline; they keep their range and
    count in no pipeline's throughput.
    """

    pipelines: tuple[tuple[Placement, ...], ...]
    idle: tuple[str, ...]
    throughput: float
    partial: tuple[Placement, ...] = ()

    def __post_init__(self) -> None:
        ends = set()
        for pipeline in self.pipelines:
            if not pipeline or pipeline[0].start != 0:
                raise ValueError("every pipeline must start at layer 0")
            if any(a.end != b.start for a, b in pairwise(pipeline)):
                raise ValueError("a pipeline's ranges must be contiguous and in order")
            ends.add(pipeline[-1].end)
        if len(ends) > 1:
            raise ValueError(f"pipelines end at different layers: {sorted(ends)}")
        placed = [p.node_id for pipeline in self.pipelines for p in pipeline] + [p.node_id for p in self.partial]
        if len(placed) != len(set(placed)):
            raise ValueError("a node appears in more than one placement")
        if set(placed) & set(self.idle):
            raise ValueError("a node is both placed and idle")
        if not self.throughput >= 0:
            raise ValueError(f"throughput must be >= 0, got {self.throughput!r}")

    @property
    def stages(self) -> int:
        """Total number of stages (hops) over all pipelines."""
        return sum(len(pipeline) for pipeline in self.pipelines)

    def assignments(self) -> dict[str, tuple[int, int]]:
        """``node_id -> (start, end)`` of every placed node (pipelines and partial)."""
        placed = [p for pipeline in self.pipelines for p in pipeline] + list(self.partial)
        return {p.node_id: (p.start, p.end) for p in placed}

    def moved_layers(self, previous: Mapping[str, tuple[int, int]]) -> int:
        """Layers that nodes must newly load compared with ``previous`` (node_id -> (start, end))."""
        return sum(_new_layers(rng, previous.get(node)) for node, rng in self.assignments().items())


def _new_layers(now: tuple[int, int], before: tuple[int, int] | None) -> int:
    """Layers of ``now`` that ``before`` did not hold."""
    if before is None:
        return now[1] - now[0]
    overlap = max(0, min(now[1], before[1]) - max(now[0], before[0]))
    return now[1] - now[0] - overlap


def max_layers(model: ModelCost, node: NodeCapacity, first: bool = False, last: bool = False) -> int:
    """How many layers fit in ``node.memory`` (weights + KV reserve), counting first/last extras if it holds them.

    Layers may differ in size (dense and mixture-of-experts layers): the count is one that fits wherever the
    range lies. A node holding layer 0 holds ``0:n`` (the first ``n`` layers must fit), one holding the last
    layer ``L-n:L``; any other node the ``n`` consecutive layers that take the most bytes must fit. With
    layers of one size this is ``room // per_layer``."""
    room = node.memory - (model.first_bytes if first else 0) - (model.last_bytes if last else 0)
    if room < 0:
        return 0
    costs, L = model.layer_costs, model.num_layers
    prefix = [0, *accumulate(costs)]  # prefix[i]: bytes of layers 0..i-1

    def most(n: int) -> int:  # the most bytes n layers take where this node can hold them
        if first or last:
            return max(prefix[n] if first else 0, prefix[L] - prefix[L - n] if last else 0)
        return max(prefix[i + n] - prefix[i] for i in range(L - n + 1))

    n = 0
    while n < L and most(n + 1) <= room:
        n += 1
    return n
