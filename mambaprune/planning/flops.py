"""FLOPs: every node's multiply-accumulates (MACs, DESIGN.md convention) in node.meta.

Counted by torch.utils.flop_counter with our ops' own formulas while an Interpreter runs the graph
on example inputs (FlopCounterMode counts 2 per MAC: halved here). The planner reads the dense
graph's annotations; the report sums the pruned graph's.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from ..meta_keys import FLOPS
from ..pass_infra import GraphPass, InvariantError, PassResult


class AnnotateFlops(GraphPass):
    """Annotate: node.meta[FLOPS] = the MACs the node performs on `flat_inputs`, per sample of
    `batch` (a graph captured with a fixed batch runs only on inputs of that batch).

    Invariant: the graph is not changed (modified is False); afterwards every node carries its MACs.
    """

    def __init__(self, flat_inputs: list, batch: int = 1):
        self.flat_inputs = flat_inputs
        self.batch = batch

    def call(self, gm: fx.GraphModule) -> PassResult:
        batch = self.batch

        class Counting(fx.Interpreter):
            def run_node(self, node):
                before = counter.get_total_flops()
                out = super().run_node(node)
                node.meta[FLOPS] = (counter.get_total_flops() - before) / 2 / batch
                return out

        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            Counting(gm).run(*self.flat_inputs)
        return PassResult(gm, False)

    def ensures(self, gm: fx.GraphModule) -> None:
        missing = [n.name for n in gm.graph.nodes if FLOPS not in n.meta and n.op != "output"]
        if missing:
            raise InvariantError(f"nodes without FLOPs after the annotation: {missing[:5]}")


def annotate_flops(gm: fx.GraphModule, flat_inputs: list) -> PassResult:
    return AnnotateFlops(flat_inputs)(gm)


def node_flops(gm: fx.GraphModule) -> dict:
    """MACs of every node, from its annotation."""
    return {node: node.meta.get(FLOPS, 0.0) for node in gm.graph.nodes}


def total_flops(gm: fx.GraphModule) -> float:
    return sum(node.meta.get(FLOPS, 0.0) for node in gm.graph.nodes)
