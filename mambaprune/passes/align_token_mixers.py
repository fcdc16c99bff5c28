"""Align: token mixers downstream of a site see the kept tokens where the alignment mode says.

Invariant: for every node in a pruned region, the result on the kept tokens equals the alignment's
definition (DESIGN.md) with `vpos` as the tokens' claimed positions:
- depthwise conv1d along the tokens -> `pos_conv1d` over the path ranks (a pruned neighbour adds 0);
- a constant token permutation (zig-zag, cross-scan order or its inverse) -> a per-sample reorder of
  the kept tokens into the ORIGINAL path restricted to them;
- a reshape to the H x W grid -> scatter to the grid (zeros at pruned cells) and, when the grid is
  flattened again, gather back: every grid op (depthwise conv2d, BN, activations) runs unchanged;
- `decay`: every selective scan gets `gap` = path steps between consecutive kept tokens.
Flips need no rewrite: a flipped pruned tensor is already the reversed path restricted to the kept.
"""
from __future__ import annotations

import torch.fx as fx

from ..compiler.token_flow import Grid, Tok, info_of, is_scan, op_name
from ..runtime import pos_conv1d, scatter_tokens
from ..runtime import token_index as ti
from .token_state import Pruned, PruneContext, Scattered


def align_node(ctx: PruneContext, old: fx.Node, args: tuple, kwargs: dict, site: int):
    """Returns the new node for `old` when a rule applies, else None."""
    if "mambaprune.conv_slice" in old.meta:
        return args[0]
    pruned_input = _pruned(ctx, args[0]) if args else None
    if op_name(old) == "aten::conv1d" and "mambaprune.conv_left" in old.meta and pruned_input:
        return _conv1d(ctx, old, args, site, pruned_input)
    if "mambaprune.permutation" in old.meta and pruned_input:
        return _permute_tokens(ctx, old, args, site, pruned_input)
    if isinstance(info_of(old), Grid) and pruned_input:
        return _enter_grid(ctx, old, args, kwargs, site, pruned_input)
    if isinstance(info_of(old), Tok) and any(isinstance(ctx.state.get(a), Scattered) for a in _nodes(args)):
        return _leave_grid(ctx, old, args, kwargs, site)
    if is_scan(old) and ctx.alignment == "decay":
        return _scan_with_gaps(ctx, old, args, kwargs, site)
    return None


def _pruned(ctx: PruneContext, value):
    state = ctx.state.get(value) if isinstance(value, fx.Node) else None
    return state if isinstance(state, Pruned) else None


def _nodes(args):
    for a in args:
        if isinstance(a, fx.Node):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, fx.Node))


def _conv1d(ctx, old, args, site, state):
    weight, bias = args[1], args[2] if len(args) > 2 else None
    ranks = ctx.ranks(site, state.tok.layout)
    node = ctx.call(pos_conv1d, args[0], weight, bias, ranks, old.meta["mambaprune.conv_left"])
    ctx.state[node] = Pruned(site, state.tok)
    return node


def _permute_tokens(ctx, old, args, site, state):
    target = info_of(old)
    index = ctx.reorder_index(site, state.tok.layout, target.layout)
    node = args[0] if index is None else ctx.call(ti.gather_tokens, args[0], index, state.tok.dim)
    ctx.state[node] = Pruned(site, target)
    return node


def _enter_grid(ctx, old, args, kwargs, site, state):
    tok = state.tok
    dense = ctx.call(scatter_tokens, args[0], ctx.ranks(site, tok.layout), tok.layout.length, tok.dim)
    node = ctx.graph.call_function(old.target, (dense,) + tuple(args[1:]), kwargs)
    ctx.state[node] = Scattered(site)
    return node


def _leave_grid(ctx, old, args, kwargs, site):
    dense = ctx.graph.call_function(old.target, args, kwargs)
    tok = info_of(old)
    node = ctx.call(ti.gather_tokens, dense, ctx.ranks(site, tok.layout), tok.dim)
    ctx.state[node] = Pruned(site, tok)
    return node


def _scan_with_gaps(ctx, old, args, kwargs, site):
    tok = info_of(old)
    gap = ctx.call(ti.path_gaps, ctx.ranks(site, tok.layout))
    kwargs = dict(kwargs)
    args = list(args)
    if len(args) > 9:
        args[9] = gap
    else:
        kwargs["gap"] = gap
    node = ctx.graph.call_function(old.target, tuple(args), kwargs)
    ctx.state[node] = Pruned(site, tok)
    return node
