"""Annotate: every node's FLOPs (MACs, DESIGN.md convention) in `node.meta["mambaprune.flops"]`.

Invariant: the graph is not changed (PassResult.modified is False); afterwards every node carries
the MACs it performed on the given inputs, counted by torch.utils.flop_counter with our ops' own
formulas (FlopCounterMode counts 2 per MAC: halved here). The planner reads the dense graph's
annotations; the report sums the pruned graph's.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils.flop_counter import FlopCounterMode

FLOPS_KEY = "mambaprune.flops"


def annotate_flops(gm: fx.GraphModule, flat_inputs: list) -> PassResult:
    class Counting(fx.Interpreter):
        def run_node(self, node):
            before = counter.get_total_flops()
            out = super().run_node(node)
            node.meta[FLOPS_KEY] = (counter.get_total_flops() - before) / 2
            return out

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        Counting(gm).run(*flat_inputs)
    return PassResult(gm, False)


def total_flops(gm: fx.GraphModule) -> float:
    return sum(node.meta.get(FLOPS_KEY, 0.0) for node in gm.graph.nodes)
