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
from ..errors import UnsupportedModelError
from ..settings import Fill
from .context import SiteContext
from .merge import unmerged
from .restore import carried, carried_stream, carry_source, nearest, scattered


def emit_stage_end(ctx: SiteContext, old: fx.Node) -> fx.Node:
    """Re-emit `old` (a node of the stage end's chain, one of its readers, or the downsampling) on dense
    inputs."""
    stage_end = ctx.analysis.stage_end(ctx.site)

    def dense(arg: fx.Node) -> fx.Node:
        if arg is stage_end.restore:
            return ctx.cached(("restored", stage_end.restore), lambda: _restore(ctx, stage_end))
        return ctx.env[arg]

    return ctx.graph.node_copy(old, dense)


def _restore(ctx: SiteContext, stage_end: StageEnd) -> fx.Node:
    """The stage's stream at full length, its pruned cells filled as `settings.fill` says (restore.py); carry
    puts back the stream itself, so the downsampling sees each pruned cell as it was at its site. When the
    downsampling reads the stream through layout ops that something else reads too (MambaVision's
    window_reverse, read by the downsampling and by a feature map's norm), `restore` is their result and carry
    re-emits them densely on the carried stream, as for a graph output."""
    value = ctx.env[stage_end.restore]
    state = ctx.state.of(value)
    if state is None:
        return value
    if ctx.settings.fill is Fill.CARRY and ctx.settings.reduction.merges:
        return unmerged(ctx, value, state)
    if ctx.settings.fill is Fill.CARRY:
        if all(ctx.analysis.stream_parts_like(stage_end.restore, key) for key in ctx.tables.sites_up_to(state.site)):
            return carried_stream(ctx, stage_end.restore)       # the stream itself
        source = carry_source(ctx, stage_end.restore)
        if not isinstance(source, tuple):
            raise UnsupportedModelError(f"fill='carry' cannot restore the stage before {stage_end.downsampling.name}: "
                                        f"{source}. Use fill='nearest' or fill='zeros'.")
        return carried(ctx, *source)
    index = ctx.tables.dense_index(state.site, state.fact.layout)
    if ctx.settings.fill is Fill.ZEROS:
        return scattered(ctx, value, state.fact, index)
    return nearest(ctx, value, state.fact, index)
