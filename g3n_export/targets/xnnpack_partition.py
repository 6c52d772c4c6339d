"""XNNPACK partitioners whose partition proposal runs in linear time.

ExecuTorch 1.5.1's XNNPACK partitioner decides per node what XNNPACK can run (its partitioner configs) and which nodes
must share a delegate (node groups, e.g. a dynamically quantized linear with its quantize/dequantize nodes). It then
turns those groups into partitions with a pairwise merge that checks every pair of candidate partitions against
transitive dependency sets. That is quadratic in the number of delegable nodes, and the 35-layer Gemma 3n graph has
thousands of them, so it dominated lowering time.

The classes below keep the configs and the groups, and replace only the merge with a "barrier level" rule. Each group
is contracted to one vertex. A group's level is the largest number of times a path from the graph inputs to it enters
a group from a non-delegated node, computed in one topological sweep. All groups of one level form one partition.

Such a partition cannot close a cycle. A path that leaves it passes through a non-delegated node or through a group of
another level. Levels never decrease along a path and grow when a path re-enters a group from a non-delegated node, so
the path cannot return to the same level. Constant placeholders have no inputs and travel with their group.

Every proposal is checked (groups whole, no cycles); a proposal that fails the check falls back to ExecuTorch's own
merge, so the result is never worse than the original, only faster.
"""

from __future__ import annotations

import logging
import operator
from collections import defaultdict, deque
from collections.abc import Sequence

from torch.fx import GraphModule, Node
from torch.fx.passes.infra.partitioner import Partition
from torch.fx.passes.utils.fuser_utils import validate_partition

log = logging.getLogger(__name__)

def level_partitions(graph_module: GraphModule, groups: Sequence[Sequence[Node]]) -> list[Partition] | None:
    """Return one partition per barrier level holding the given node groups, or None when the rule does not apply.

    Each group is contracted to one vertex, so its members share a level by construction. The levels are longest
    paths in the contracted graph, counted in non-delegated nodes, and one topological sweep (Kahn's algorithm)
    computes them. A cycle in the contracted graph means a group cannot be one partition, and returns None.

    Args:
        graph_module: the graph whose nodes `groups` refers to.
        groups: disjoint node groups that must each end up in one partition; their union is the delegable set.
    """
    vertex: dict[Node, object] = {}
    for index, group in enumerate(groups):
        for node in group:
            vertex[node] = ("group", index)
    nodes = [n for n in graph_module.graph.nodes if n.op == "call_function"]
    for node in nodes:
        vertex.setdefault(node, node)

    successors: dict[object, set[object]] = defaultdict(set)
    indegree: dict[object, int] = {vertex[n]: 0 for n in nodes}
    for node in nodes:
        target = vertex[node]
        for source in node.all_input_nodes:
            if source.op != "call_function":
                continue  # placeholders have no inputs and cannot close a cycle
            origin = vertex[source]
            if origin != target and target not in successors[origin]:
                successors[origin].add(target)
                indegree[target] += 1

    # A non-delegated node carries the highest level among the groups it depends on (-1 for none), so a run of
    # non-delegated nodes between two groups costs one level, not one per node.
    delegated = {v for v in indegree if isinstance(v, tuple)}
    level = {v: 0 if v in delegated else -1 for v in indegree}
    ready = deque(v for v, d in indegree.items() if d == 0)
    visited = 0
    while ready:
        current = ready.popleft()
        visited += 1
        for successor in successors[current]:
            entering = successor in delegated and current not in delegated
            level[successor] = max(level[successor], level[current] + (1 if entering else 0))
            indegree[successor] -= 1
            if indegree[successor] == 0:
                ready.append(successor)
    if visited != len(indegree):
        log.debug("node groups form a cycle: only %d of %d vertices could be ordered", visited, len(indegree))
        return None

    by_level: dict[int, list[Node]] = {}
    for index, group in enumerate(groups):
        key = ("group", index)
        if key in level:  # a group of constants alone has no call_function member and gets no partition
            by_level.setdefault(level[key], []).extend(group)

    partitions = [Partition(id=i, nodes=by_level[k]) for i, k in enumerate(sorted(by_level))]
    _move_getitems(partitions)
    return partitions


def _move_getitems(partitions: list[Partition]) -> None:
    # A delegate returns flat tensors, so the getitem users of a tuple-valued node belong in that node's partition.
    owner = {node: p for p in partitions for node in p.nodes}
    for node, partition in list(owner.items()):
        users = list(node.users)
        if not users or any(u.op != "call_function" or u.target is not operator.getitem for u in users):
            continue
        for user in users:
            current = owner.get(user)
            if current is partition:
                continue
            if current is not None:
                current.remove_node(user)
            partition.add_node(user)
            owner[user] = partition


def proposal_is_valid(partitions: list[Partition], groups: Sequence[Sequence[Node]]) -> bool:
    """Check that every group lies inside one partition and that no partition closes a dependency cycle."""
    owner: dict[Node, int] = {}
    for index, partition in enumerate(partitions):
        for node in partition.nodes:
            if node in owner:
                return False
            owner[node] = index
    for group in groups:
        if len({owner.get(node) for node in group if node.op == "call_function"}) > 1:
            return False
    return all(validate_partition(list(p.nodes)) for p in partitions)


def _fast(cls):
    """Subclass an ExecuTorch config-based partitioner so that it proposes partitions by barrier level."""

    class Fast(cls):
        def generate_partitions(self, ep) -> list[Partition]:
            if getattr(self, "per_op_mode", False):
                return super().generate_partitions(ep)
            groups = self.get_matched_nodes_from_configs(ep)
            partitions = level_partitions(ep.graph_module, groups)
            if partitions is None or not proposal_is_valid(partitions, groups):
                log.warning("falling back to ExecuTorch's pairwise XNNPACK partitioning (slow on large graphs)")
                return super().generate_partitions(ep)
            log.debug("%s: %d partitions from %d node groups", cls.__name__, len(partitions), len(groups))
            return partitions

    Fast.__name__ = Fast.__qualname__ = f"Fast{cls.__name__}"
    return Fast


def xnnpack_partitioners() -> list:
    """Return the partitioners for `to_edge_transform_and_lower`: one that takes every precision XNNPACK supports.

    ExecuTorch's LLM export puts a dynamically quantized partitioner first. For it every float op is a barrier, so
    each sequential linear becomes its own delegate (526 on the bundled E2B slice), and ExecuTorch then rebuilds the
    whole graph once per delegate. With one partitioner the quantized linears share partitions with the float ops
    around them, and a 4-layer 8da4w decoder lowers to 5 partitions.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return [_fast(XnnpackPartitioner)()]
