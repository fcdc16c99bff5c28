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

from ..compiler.token_flow import Grid, info_of, shape_of
from ..errors import UnsupportedModelError
from ..runtime import scatter_tokens
from ..runtime import token_index as ti
from ..runtime.token_ops import put_tokens
from .gather_streams import summed_stream
from .token_state import Pruned, PruneContext


def emit_stage_end(ctx: PruneContext, analysis, old: fx.Node, env: dict, site: int, stage_fill: str) -> fx.Node:
    """Re-emit `old` (a node of the stage end's chain, or the downsampling) on dense inputs."""
    stage_end = analysis.stage_ends[site]

    def dense(arg: fx.Node) -> fx.Node:
        if arg is stage_end.restore:
            return _restored(ctx, analysis, stage_end, env, stage_fill)
        return env[arg]

    return ctx.graph.node_copy(old, dense)


def _restored(ctx: PruneContext, analysis, stage_end, env: dict, stage_fill: str) -> fx.Node:
    key = ("restored", stage_end.restore)
    if key not in ctx._cache:
        ctx._cache[key] = _restore(ctx, analysis, stage_end, env, stage_fill)
    return ctx._cache[key]


def _restore(ctx: PruneContext, analysis, stage_end, env: dict, stage_fill: str) -> fx.Node:
    value = env[stage_end.restore]
    state = ctx.state.get(value)
    if not isinstance(state, Pruned):
        return value
    tok = state.tok
    if stage_fill == "zeros":
        index = ctx.dense_index(state.site, tok.layout)
        if isinstance(tok, Grid):
            return ctx.call(ti.scatter_grid, value, index, tok.height, tok.width, tok.hdim, tok.wdim)
        return ctx.call(scatter_tokens, value, index, tok.layout.length, tok.dim)
    first, *later = ctx.site_order[:ctx.site_order.index(state.site) + 1]
    dense = _crossing_stream(ctx, analysis, stage_end, env, first)
    for key in later:
        stream = _crossing_stream(ctx, analysis, stage_end, env, key)
        dense = _put(ctx, dense, stream, ctx.previous_site(key), tok)
    return _put(ctx, dense, value, state.site, tok)


def _put(ctx: PruneContext, dense: fx.Node, pruned: fx.Node, site: int, tok) -> fx.Node:
    index = ctx.dense_index(site, tok.layout)
    if isinstance(tok, Grid):
        return ctx.call(ti.put_grid, dense, pruned, index, tok.hdim, tok.wdim)
    return ctx.call(put_tokens, dense, pruned, index, tok.dim)


def _crossing_stream(ctx: PruneContext, analysis, stage_end, env: dict, key: int) -> fx.Node:
    """The stream at site `key`: the sum of the tensors like the restored one (shape, token axis and
    order) that cross the site. One for a stream updated inside the block (VMamba's x); x and f(x)
    when the residual add of the block comes after it (ViM's hidden and residual)."""
    wanted = (info_of(stage_end.restore), tuple(shape_of(stage_end.restore)[1:]))
    parts = [n for n in analysis.crossing_tokens(key) if (info_of(n), tuple(shape_of(n)[1:])) == wanted]
    if not parts:
        raise UnsupportedModelError(
            f"stage_fill='carry' found no tensor like {stage_end.restore.name} crossing the site after block {key} "
            f"(the stream that ends at the downsampling {stage_end.downsampling.name}). Use stage_fill='zeros'.")
    # the stream crossing `key` holds the tokens kept at the site before it
    return summed_stream(ctx, parts, env, ctx.previous_site(key))
