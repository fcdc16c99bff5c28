"""Readout: constant-index reads of the token axis follow their token; token outputs are restored.

Invariant: `x[:, i]` on a pruned tensor reads, per sample, the slot that now holds the token the
dense graph read at i (a protected token, so always kept). Pooling over the tokens needs no rewrite:
it pools the kept tokens. A graph output that still carries tokens is scattered back to L slots
(zeros at pruned positions) so that the model keeps its output shapes; a grid output is scattered
back to its H x W cells.
"""
from __future__ import annotations

import torch.fx as fx

from ...analysis import Grid, MultiTok, Readout, fact_of
from ...analysis.ops import op_name
from ...errors import UnsupportedModelError
from ...runtime import scatter_tokens
from ...runtime import token_index as ti
from ..context import RewriteContext, SiteContext
from .base import RewriteRule, pruned_input


class RemapReadout(RewriteRule):
    """x.select(token_dim, i) of a pruned tensor -> a per-sample read of the slot holding position i."""

    def matches(self, ctx: SiteContext, old: fx.Node, args: tuple) -> bool:
        return op_name(old) == "aten::select" and isinstance(fact_of(old), Readout) \
            and pruned_input(ctx, args) is not None

    def emit(self, ctx: SiteContext, old: fx.Node, args: tuple, kwargs: dict) -> fx.Node:
        state = pruned_input(ctx, args)
        positions = ctx.tables.positions(ctx.site, state.fact.layout)
        slot = ctx.call(ti.slot_of_position, positions, fact_of(old).position)
        return ctx.call(ti.read_slot, args[0], slot, state.fact.dim)


def restore_output(rewrite: RewriteContext, value):
    """`value` (a graph output) with its token axis back at full length."""
    if isinstance(value, (list, tuple)):
        return type(value)(restore_output(rewrite, v) for v in value)
    state = rewrite.state.of(value)
    if state is None:
        return value
    fact = state.fact
    if isinstance(fact, MultiTok) or fact is None:
        raise UnsupportedModelError(f"the model output {value.name} holds directions in different token orders")
    index = rewrite.tables(state.site).dense_index(state.site, fact.layout)
    if isinstance(fact, Grid):
        return rewrite.builder.call(ti.scatter_grid, value, index, fact.height, fact.width, fact.hdim, fact.wdim)
    return rewrite.builder.call(scatter_tokens, value, index, fact.layout.length, fact.dim)
