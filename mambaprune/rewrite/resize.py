"""Resize: shape arguments that spell out the token count L are rewritten to the site's K.

Invariant: a view/reshape/expand of a pruned tensor keeps every dimension of the dense graph but
the token axis, which becomes K (the graph was exported with static token counts, so reshapes
carry L as a literal integer); a flattened batch x tokens dim becomes -1 (batch * K, inferred); a
grid's H and W become K and 1 (a pruned grid is the K x 1 column of its kept cells; so is each
direction of a MultiGrid).
"""
from __future__ import annotations

import torch.fx as fx

from ..analysis import BatchTok, Grid, MultiGrid, MultiTok, Tok, fact_of
from ..analysis.ops import SHAPE_ARGUMENT_OPS, op_name
from .context import SiteContext


def resize_shape_args(ctx: SiteContext, old: fx.Node, args: tuple) -> tuple:
    out = fact_of(old)
    if op_name(old) == "aten::unflatten" and isinstance(out, Grid):
        return _unflatten_grid(ctx, args)
    if op_name(old) not in SHAPE_ARGUMENT_OPS or not isinstance(out, (Tok, BatchTok, Grid, MultiTok, MultiGrid)) or len(args) < 2:
        return args
    if ctx.state.of(args[0]) is None:
        return args
    shape = list(args[1])
    if isinstance(out, BatchTok):
        # batch * L is a symbolic product in the graph: let the view infer batch * K
        if -1 not in shape:
            shape[out.dim] = -1
    elif isinstance(out, (Grid, MultiGrid)):
        for dim, size in ((out.hdim, ctx.keep), (out.wdim, 1)):
            if isinstance(shape[dim], int) and shape[dim] != -1:
                shape[dim] = size
    elif isinstance(shape[out.dim], int) and shape[out.dim] != -1:
        shape[out.dim] = ctx.keep
    return (args[0], shape) + tuple(args[2:])


def _unflatten_grid(ctx: SiteContext, args: tuple) -> tuple:
    """x.unflatten(token_dim, (H, W)) of a pruned tensor -> (K, 1)."""
    if ctx.state.of(args[0]) is None:
        return args
    return (args[0], args[1], [ctx.keep, 1]) + tuple(args[3:])
