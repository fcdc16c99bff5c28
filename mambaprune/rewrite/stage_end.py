"""Restore: before the downsampling that ends a pruned stage, the stage's tokens are whole again.

Invariant: the downsampling (a conv2d that changes the token grid; analysis.StageEnd) and the
layout-only ops that lead to it (a transpose and a reshape of a (B, L, C) sequence to its grid) run
on the dense tensor: the kept tokens where the pruned graph computed them, every pruned token filled
as `settings.fill` says, with the meaning it has for graph outputs (restore.py): "carry" puts back the
value the stream had at the site where the token was pruned (each token its own site's), "nearest"
the nearest kept cell's, "zeros" 0.
Everything after the downsampling is dense (the next stage starts afresh and may have sites of its
own). With every token kept the result is exactly the dense graph's, whatever the fill.
"""
from __future__ import annotations

import torch.fx as fx

from ..analysis import StageEnd
from ..settings import Fill
from .context import SiteContext
from .merge import unmerged
from .restore import carried_stream, nearest, scattered


def emit_stage_end(ctx: SiteContext, old: fx.Node) -> fx.Node:
    """Re-emit `old` (a node of the stage end's chain, or the downsampling) on dense inputs."""
    stage_end = ctx.analysis.stage_end(ctx.site)

    def dense(arg: fx.Node) -> fx.Node:
        if arg is stage_end.restore:
            return ctx.cached(("restored", stage_end.restore), lambda: _restore(ctx, stage_end))
        return ctx.env[arg]

    return ctx.graph.node_copy(old, dense)


def _restore(ctx: SiteContext, stage_end: StageEnd) -> fx.Node:
    """The stage's stream at full length, its pruned cells filled as `settings.fill` says (restore.py); carry
    puts back the stream itself, so the downsampling sees each pruned cell as it was at its site."""
    value = ctx.env[stage_end.restore]
    state = ctx.state.of(value)
    if state is None:
        return value
    if ctx.settings.fill is Fill.CARRY and ctx.settings.reduction.merges:
        return unmerged(ctx, value, state)
    if ctx.settings.fill is Fill.CARRY:
        return carried_stream(ctx, stage_end.restore)
    index = ctx.tables.dense_index(state.site, state.fact.layout)
    if ctx.settings.fill is Fill.ZEROS:
        return scattered(ctx, value, state.fact, index)
    return nearest(ctx, value, state.fact, index)
