"""Conv2d: a conv2d that looks at neighbours runs, unchanged, on the pruned grid scattered back.

Invariant: a pruned H x W grid is the K x 1 column of its kept cells (gather.py), so per-token grid
ops run unchanged; a conv2d that reads neighbouring cells scatters the column to a zero grid at
the cells' claimed positions, convolves as the model does, and gathers the kept cells back.
"""
from __future__ import annotations

import torch.fx as fx

from ...analysis import Grid, fact_of
from ...analysis.ops import looks_at_neighbours, op_name
from ...runtime import token_index as ti
from ..context import SiteContext
from .base import RewriteRule, pruned_input


class NeighbourConv2d(RewriteRule):
    def matches(self, ctx: SiteContext, old: fx.Node, args: tuple) -> bool:
        state = pruned_input(ctx, args)
        return op_name(old) == "aten::conv2d" and state is not None and isinstance(state.fact, Grid) \
            and looks_at_neighbours(old)

    def emit(self, ctx: SiteContext, old: fx.Node, args: tuple, kwargs: dict) -> fx.Node:
        grid = pruned_input(ctx, args).fact
        ranks = ctx.tables.ranks(ctx.site, grid.layout)
        dense = ctx.call(ti.scatter_grid, args[0], ranks, grid.height, grid.width, grid.hdim, grid.wdim)
        conv = ctx.graph.call_function(old.target, (dense,) + tuple(args[1:]), kwargs)
        node = ctx.call(ti.gather_grid, conv, ranks, grid.hdim, grid.wdim)
        return ctx.state.mark(node, ctx.site, fact_of(old))
