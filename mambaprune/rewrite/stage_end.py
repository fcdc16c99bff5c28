"""Restore: before the downsampling that ends a pruned stage, the stage's tokens are whole again.

Invariant: the downsampling (a conv2d that changes the token grid; analysis.StageEnd) and the
layout-only ops that lead to it (a transpose and a reshape of a (B, L, C) sequence to its grid) run
on the dense tensor: the kept tokens where the pruned graph computed them, every pruned token filled
as `stage_fill` says:
- "carry": the value the stream had at the site where the token was pruned (the residual stream
  stops updating it; with several sites in the stage each token carries its own site's value);
- "zeros": 0.
Everything after the downsampling is dense (the next stage starts afresh and may have sites of its
own). With every token kept the result is exactly the dense graph's, whatever the fill.
"""
from __future__ import annotations

import torch.fx as fx

from ..analysis import Grid, StageEnd, fact_of
from ..analysis.ops import shape_of
from ..errors import UnsupportedModelError
from ..runtime import scatter_tokens
from ..runtime import token_index as ti
from ..runtime.token_ops import put_tokens
from ..settings import StageFill
from .context import SiteContext
from .gather import summed_stream


def emit_stage_end(ctx: SiteContext, old: fx.Node) -> fx.Node:
    """Re-emit `old` (a node of the stage end's chain, or the downsampling) on dense inputs."""
    stage_end = ctx.analysis.stage_end(ctx.site)

    def dense(arg: fx.Node) -> fx.Node:
        if arg is stage_end.restore:
            return ctx.cached(("restored", stage_end.restore), lambda: _restore(ctx, stage_end))
        return ctx.env[arg]

    return ctx.graph.node_copy(old, dense)


def _restore(ctx: SiteContext, stage_end: StageEnd) -> fx.Node:
    value = ctx.env[stage_end.restore]
    state = ctx.state.of(value)
    if state is None:
        return value
    fact, tables = state.fact, ctx.tables
    if ctx.settings.stage_fill is StageFill.ZEROS:
        index = tables.dense_index(state.site, fact.layout)
        if isinstance(fact, Grid):
            return ctx.call(ti.scatter_grid, value, index, fact.height, fact.width, fact.hdim, fact.wdim)
        return ctx.call(scatter_tokens, value, index, fact.layout.length, fact.dim)
    first, *later = tables.sites_up_to(state.site)
    dense = _crossing_stream(ctx, stage_end, first)
    for key in later:
        dense = _put(ctx, dense, _crossing_stream(ctx, stage_end, key), tables.previous_site(key), fact)
    return _put(ctx, dense, value, state.site, fact)


def _put(ctx: SiteContext, dense: fx.Node, pruned: fx.Node, site: int, fact) -> fx.Node:
    index = ctx.tables.dense_index(site, fact.layout)
    if isinstance(fact, Grid):
        return ctx.call(ti.put_grid, dense, pruned, index, fact.hdim, fact.wdim)
    return ctx.call(put_tokens, dense, pruned, index, fact.dim)


def _crossing_stream(ctx: SiteContext, stage_end: StageEnd, key: int) -> fx.Node:
    """The stream at site `key`: the sum of the tensors like the restored one (shape, token axis and
    order) that cross the site. One for a stream updated inside the block (VMamba's x); x and f(x)
    when the residual add of the block comes after it (ViM's hidden and residual)."""
    wanted = (fact_of(stage_end.restore), tuple(shape_of(stage_end.restore)[1:]))
    parts = [n for n in ctx.analysis.crossing_tokens(key) if (fact_of(n), tuple(shape_of(n)[1:])) == wanted]
    if not parts:
        raise UnsupportedModelError(
            f"stage_fill='carry' found no tensor like {stage_end.restore.name} crossing the site after block {key} "
            f"(the stream that ends at the downsampling {stage_end.downsampling.name}). Use stage_fill='zeros'.")
    # the stream crossing `key` holds the tokens kept at the site before it
    return summed_stream(ctx, parts, ctx.tables.previous_site(key))
