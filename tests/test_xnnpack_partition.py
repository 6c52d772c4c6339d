"""The barrier-level XNNPACK partition proposal: groups stay whole, no partition closes a cycle, and on a real decoder
graph it needs no more partitions than ExecuTorch's own pairwise merge."""

from __future__ import annotations

import operator

import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackDynamicallyQuantizedPartitioner
from executorch.exir import EdgeCompileConfig, to_edge
from torch import fx
from torch.fx.passes.infra.partitioner import Partition

from g3n_export.checkpoint import open_checkpoint
from g3n_export.targets.executorch import build_decoder, export_program
from g3n_export.targets.recipe import ExecuTorchSpec
from g3n_export.targets.xnnpack_partition import level_partitions, proposal_is_valid
from helpers import tiny_text_config, write_tiny_checkpoint


def _graph() -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    # x -> a -> u -> b -> c, and x -> d -> c, where u stands for an operator XNNPACK does not run.
    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(torch.relu, (x,), name="a")
    u = graph.call_function(torch.argmax, (a,), name="u")
    b = graph.call_function(torch.neg, (u,), name="b")
    d = graph.call_function(torch.sigmoid, (x,), name="d")
    c = graph.call_function(operator.add, (b, d), name="c")
    graph.output(c)
    module = fx.GraphModule(torch.nn.Module(), graph)
    return module, {node.name: node for node in module.graph.nodes}


def _names(partitions) -> list[set[str]]:
    return [{node.name for node in p.nodes} for p in partitions]


def test_levels_split_at_undelegated_node():
    module, n = _graph()
    groups = [[n["a"]], [n["b"], n["c"]], [n["d"]]]

    partitions = level_partitions(module, groups)

    assert partitions is not None
    assert _names(partitions) == [{"a", "d"}, {"b", "c"}]
    assert proposal_is_valid(partitions, groups)


def test_group_across_barrier_is_rejected():
    module, n = _graph()

    # a and b cannot share a delegate: u sits between them and stays outside.
    assert level_partitions(module, [[n["a"], n["b"]], [n["c"]]]) is None


def test_validity_check_catches_cycle():
    module, n = _graph()

    # {a, b} with u outside: a feeds u, which feeds b, so the delegate would wait for its own output.
    cyclic = [Partition(id=0, nodes=[n["a"], n["b"]])]

    assert not proposal_is_valid(cyclic, [[n["a"], n["b"]]])


def test_decoder_graph_partitions(tmp_path):
    # Two layers (one sliding, one full attention) with 8da4w linears: the dynamically quantized groups are the ones
    # that span several nodes. Deeper graphs only repeat the layer pattern.
    config = tiny_text_config(2, sliding_window=8, num_kv_shared_layers=0,
                              layer_types=["sliding_attention", "full_attention"], sparsity=[0.95, 0.0])
    spec = ExecuTorchSpec(linear="8da4w", group_size=32, embedding="int8", ple="int4")
    source = open_checkpoint(write_tiny_checkpoint(tmp_path / "checkpoint", config, seed=1))
    model, _ = build_decoder(source, spec, 32)
    program = to_edge(export_program(model, 32), compile_config=EdgeCompileConfig(_check_ir_validity=False))
    program = program.exported_program()
    original = XnnpackDynamicallyQuantizedPartitioner()

    groups = original.get_matched_nodes_from_configs(program)
    partitions = level_partitions(program.graph_module, groups)

    assert partitions is not None
    assert proposal_is_valid(partitions, groups)
    delegated = {node for group in groups for node in group}
    assert delegated <= {node for p in partitions for node in p.nodes}
    assert len(partitions) <= len(original.generate_partitions(program))
