"""Layer allocator: which node serves which layers, in how many pipelines (pure Python).

A model has ``L`` decoder layers. A *pipeline* is a chain of nodes, each serving a contiguous half-open
global range ``[start, end)``, together covering ``0..L`` once, in order. Several pipelines (replicas)
exist when the memory allows. :func:`plan` is called whenever nodes join or leave; the scheduler then
writes every node's range to the KV store.

Objective. Maximize the cluster's estimated decode throughput::

    throughput = sum over pipelines of 1000 / max over its stages of (layers * node.layer_ms + hop_ms)

tokens/s (the slowest stage bounds a pipeline, since micro-batches are in flight), with the fewest
hops. The choice is lexicographic: among the plans whose throughput is at least ``1 - tolerance`` times
the best found, prefer fewer stages (hops) in total, then fewer moved layers versus ``previous``
(layers a node must newly load; not counted without ``previous``), then higher throughput, then
node-id order. Stability: when ``previous`` is given, the plans that keep every still-usable previous
placement of an auto node (same node, same range, in a complete pipeline; the gaps left by departed
nodes filled by idle or new nodes, new replicas made of idle or new nodes) are the incumbents. Another
plan replaces them only if it is more than ``tolerance`` faster than the best of them (the best
incumbent is below ``1 - tolerance`` times its throughput); the lexicographic rule then picks among
such plans, otherwise among the incumbents. (The incumbents are those among the candidates below:
with hand-placed nodes the surviving chains may be recovered otherwise than they were, since
``previous`` does not say which of them were partial, and the best incumbent can be missed.)

Algorithm. Within one pipeline with a given node set, layers are water-filled: each layer goes to the
node whose stage time grows least (exactly the smallest stage time ``T`` with
``sum min(max_layers, floor((T - hop_ms) / layer_ms)) >= L``), so faster nodes get more layers and
nobody exceeds memory; the nodes with the most spare room take layer 0 (embeddings) and layer ``L - 1``
(final norm and lm_head). Layers may differ in size (dense and mixture-of-experts layers): a node's room
counts each layer at its own size (:func:`max_layers`: the first and last layers exactly, any other range
at the most bytes that many consecutive layers take), so every placed range fits. Nodes are spread over ``k = 1..K`` pipelines (``K`` bounded by the total
memory) greedily (the strongest node to the gap missing most capacity, then to the slowest estimated
pipeline), improved by
steepest ascent over single-node moves and two-node swaps, then pruned one node or pipeline at a time
(fewer hops) to give the tolerance rule its choices. With ``previous``, the surviving chains are
recovered (a min-cost flow over layer boundaries that keeps as many previous placements as it can),
and repair candidates keep them and fill their gaps by growing neighbours or with idle nodes, or with
idle nodes alone (every kept range as it is, the repaired chains then re-paired at shared boundaries
where that is faster: the incumbents), besides the fresh plans. Hand-placed (``fixed``) ranges stay
exactly as they are (their memory is the operator's business and is not checked): conflicting ones go
to different pipelines, auto nodes fill the gaps, and fixed nodes left in no complete pipeline are
reported in :attr:`Plan.partial`. If the
heuristics complete no pipeline, an exact search over chains (bounded to a few hundred thousand
states) decides between one complete pipeline and :class:`Unplaceable`, so a layer range is never left
unserved while the memory can serve it.

Compared with GradientHQ Parallax's allocator (a dynamic program over the number of pipelines that
maximizes ``k^2 / stages``, then FLOPs-proportional water-filling of layers), we maximize the estimated
tokens/s directly (stage time includes the per-hop cost and each node's measured speed) and, within a
tolerance, prefer fewer hops and fewer moved layers, so joins and departures disturb few nodes.

Modules: :mod:`.types` (what goes in and out: :class:`ModelCost`, :class:`NodeCapacity`,
:class:`Placement`, :class:`Plan`), :mod:`.fill` (pipeline skeletons and water-filling a gap),
:mod:`.search` (spreading free nodes over pipelines), :mod:`.incumbents` (the surviving chains of
``previous``) and :mod:`.choice` (the candidates, the tolerance rule and :func:`plan`). The walks over
bare layer ranges (the min-cost flow among them) are :mod:`parallax.scheduler.graph`'s.
"""

from parallax.broker.errors import Unplaceable
from parallax.scheduler.planner.choice import plan
from parallax.scheduler.planner.types import ModelCost, NodeCapacity, Placement, Plan, max_layers

__all__ = ["ModelCost", "NodeCapacity", "Placement", "Plan", "Unplaceable", "max_layers", "plan"]
