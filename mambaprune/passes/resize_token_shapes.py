"""Resize: shape arguments that spell out the token count L are rewritten to the site's K.

Invariant: a view/reshape/expand of a pruned tensor keeps every dimension of the dense graph but
the token axis, which becomes K (the graph was exported with static token counts, so reshapes
carry L as a literal integer); a flattened batch x tokens dim becomes -1 (batch * K, inferred); a
grid's H and W become K and 1 (a pruned grid is the K x 1 column of its kept cells).
"""
from __future__ import annotations

import torch.fx as fx

from ..compiler.token_flow import BatchTok, Grid, MultiTok, Tok, info_of, op_name
from .token_state import Pruned, PruneContext

_SHAPE_ARG_OPS = {"aten::view", "aten::reshape", "aten::_unsafe_view", "aten::expand"}


def resize_shape_args(ctx: PruneContext, old: fx.Node, args: tuple, site: int) -> tuple:
    out = info_of(old)
    if op_name(old) == "aten::unflatten" and isinstance(out, Grid):
        return _unflatten_grid(ctx, old, args, site, out)
    if op_name(old) not in _SHAPE_ARG_OPS or not isinstance(out, (Tok, BatchTok, Grid, MultiTok)) or len(args) < 2:
        return args
    state = ctx.state.get(args[0]) if isinstance(args[0], fx.Node) else None
    if not isinstance(state, Pruned):
        return args
    shape = list(args[1])
    if isinstance(out, BatchTok):
        # batch * L is a symbolic product in the graph: let the view infer batch * K
        if -1 not in shape:
            shape[out.dim] = -1
    elif isinstance(out, Grid):
        for dim, size in ((out.hdim, ctx.sites[site].keep), (out.wdim, 1)):
            if isinstance(shape[dim], int) and shape[dim] != -1:
                shape[dim] = size
    elif isinstance(shape[out.dim], int) and shape[out.dim] != -1:
        shape[out.dim] = ctx.sites[site].keep
    return (args[0], shape) + tuple(args[2:])


def _unflatten_grid(ctx: PruneContext, old: fx.Node, args: tuple, site: int, out: Grid) -> tuple:
    """x.unflatten(token_dim, (H, W)) of a pruned tensor -> (K, 1)."""
    state = ctx.state.get(args[0]) if isinstance(args[0], fx.Node) else None
    if not isinstance(state, Pruned):
        return args
    return (args[0], args[1], [ctx.sites[site].keep, 1]) + tuple(args[3:])
