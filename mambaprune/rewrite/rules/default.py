"""Copy: any other node of a pruned region is re-emitted as it is, on arguments cut to the site.

Invariant: shape arguments that spell out the token count are resized to K (resize.py); the new
node holds pruned tokens (in the dense graph's layout) when any of its inputs does and its
output carries tokens; a pruned grid flattened in another order is reordered (leave_grid).
"""
from __future__ import annotations

import torch.fx as fx

from ...analysis import BatchTok, Grid, MultiGrid, MultiTok, Tok, fact_of
from ..context import SiteContext
from ..resize import resize_shape_args
from .base import RewriteRule
from .permutation import leave_grid


class CopyNode(RewriteRule):
    def matches(self, ctx: SiteContext, old: fx.Node, args: tuple) -> bool:
        return True

    def emit(self, ctx: SiteContext, old: fx.Node, args: tuple, kwargs: dict) -> fx.Node:
        args = resize_shape_args(ctx, old, args)
        node = ctx.graph.create_node(old.op, old.target, args, kwargs, name=old.name)
        mark_state(ctx, old, node)
        return leave_grid(ctx, old, node)


def mark_state(ctx: SiteContext, old: fx.Node, node: fx.Node) -> None:
    pruned = [s for s in (ctx.state.of(a) for a in node.all_input_nodes) if s is not None]
    out = fact_of(old)
    if pruned and isinstance(out, (Tok, BatchTok, Grid, MultiTok, MultiGrid, tuple)):
        ctx.state.mark(node, max(s.site for s in pruned), None if isinstance(out, tuple) else out)
