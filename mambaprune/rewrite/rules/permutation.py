"""Permutation: a constant token permutation (zig-zag, a cross-scan order or its inverse) of a
pruned tensor reorders the kept tokens into the ORIGINAL path restricted to them.

Invariant: the output holds the kept tokens sorted along the permuted layout (per sample: the
order of the kept tokens along that path). A pruned grid flattened in another order than its own
(a column-major direction) is reordered the same way (`leave_grid`, used by the default rule).
"""
from __future__ import annotations

import torch.fx as fx

from ...analysis import Grid, Tok, fact_of
from ...meta_keys import PERMUTATION
from ...runtime import token_index as ti
from ..context import SiteContext
from .base import RewriteRule, pruned_input


class ReorderTokens(RewriteRule):
    def matches(self, ctx: SiteContext, old: fx.Node, args: tuple) -> bool:
        return PERMUTATION in old.meta and pruned_input(ctx, args) is not None

    def emit(self, ctx: SiteContext, old: fx.Node, args: tuple, kwargs: dict) -> fx.Node:
        state = pruned_input(ctx, args)
        target = fact_of(old)
        index = ctx.tables.reorder_index(ctx.site, state.fact.layout, target.layout)
        node = args[0] if index is None else ctx.call(ti.gather_tokens, args[0], index, state.fact.dim)
        return ctx.state.mark(node, ctx.site, target)


def leave_grid(ctx: SiteContext, old: fx.Node, node: fx.Node) -> fx.Node:
    """A pruned grid flattened in another order than its own: reorder the kept tokens into it."""
    out = fact_of(old)
    source = ctx.state.of(node.args[0]) if node.args else None
    if not isinstance(out, Tok) or source is None or not isinstance(source.fact, Grid) \
            or source.fact.layout == out.layout:
        return node
    ctx.state.mark(node, ctx.site, Tok(out.dim, source.fact.layout))
    index = ctx.tables.reorder_index(ctx.site, source.fact.layout, out.layout)
    return ctx.state.mark(ctx.call(ti.gather_tokens, node, index, out.dim), ctx.site, out)
