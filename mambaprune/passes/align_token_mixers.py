"""Align: token mixers downstream of a site see the kept tokens where the alignment mode says.

Invariant: for every node in a pruned region, the result on the kept tokens equals the alignment's
definition (DESIGN.md) with `vpos` as the tokens' claimed positions:
- depthwise conv1d along the tokens -> `pos_conv1d` over the path ranks (a pruned neighbour adds 0);
- a constant token permutation (zig-zag, cross-scan order or its inverse) -> a per-sample reorder of
  the kept tokens into the ORIGINAL path restricted to them;
- a pruned H x W grid is a K x 1 column of its kept cells (gather_streams, resize_token_shapes), so
  per-token grid ops run unchanged; a conv2d that looks at neighbours scatters the column to a zero
  grid, runs unchanged and gathers the kept cells back; a grid read in another order (flattened
  after a transpose: a column-major direction) is reordered into the ORIGINAL path of that order
  restricted to the kept tokens;
- `decay`: every selective scan gets `gap` = path steps between consecutive kept tokens.
Flips need no rewrite: a flipped pruned tensor is already the reversed path restricted to the kept;
neither do directions folded into one tensor (MultiTok): each part is already in its own order.
"""
from __future__ import annotations

import torch.fx as fx

from ..compiler.token_flow import Grid, MultiTok, Tok, info_of, is_scan, op_name
from ..errors import UnsupportedModelError
from ..runtime import pos_conv1d
from ..runtime import token_index as ti
from .token_state import Pruned, PruneContext


def align_node(ctx: PruneContext, old: fx.Node, args: tuple, kwargs: dict, site: int):
    """Returns the new node for `old` when a rule applies, else None."""
    if "mambaprune.conv_slice" in old.meta:
        return args[0]
    pruned_input = _pruned(ctx, args[0]) if args else None
    if op_name(old) == "aten::conv1d" and "mambaprune.conv_left" in old.meta and pruned_input:
        return _conv1d(ctx, old, args, site, pruned_input)
    if "mambaprune.permutation" in old.meta and pruned_input:
        return _permute_tokens(ctx, old, args, site, pruned_input)
    if op_name(old) == "aten::conv2d" and pruned_input and isinstance(pruned_input.tok, Grid) \
            and _looks_at_neighbours(old):
        return _conv2d(ctx, old, args, kwargs, site, pruned_input.tok)
    if is_scan(old) and ctx.alignment == "decay":
        return _scan_with_gaps(ctx, old, args, kwargs, site)
    return None


def leave_grid(ctx: PruneContext, old: fx.Node, node: fx.Node, site: int) -> fx.Node:
    """A pruned grid flattened in another order than its own: reorder the kept tokens into it."""
    out = info_of(old)
    source = _pruned(ctx, node.args[0]) if node.args else None
    if not isinstance(out, Tok) or source is None or not isinstance(source.tok, Grid) \
            or source.tok.layout == out.layout:
        return node
    ctx.state[node] = Pruned(site, Tok(out.dim, source.tok.layout))
    index = ctx.reorder_index(site, source.tok.layout, out.layout)
    reordered = ctx.call(ti.gather_tokens, node, index, out.dim)
    ctx.state[reordered] = Pruned(site, out)
    return reordered


def _pruned(ctx: PruneContext, value):
    state = ctx.state.get(value) if isinstance(value, fx.Node) else None
    return state if isinstance(state, Pruned) else None


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


def _looks_at_neighbours(conv: fx.Node) -> bool:
    """Anything but a 1x1 kernel without padding (a per-token linear layer written as a conv2d)."""
    kernel = tuple(conv.args[1].meta["val"].shape[-2:])
    padding = conv.args[4] if len(conv.args) > 4 else conv.kwargs.get("padding", [0, 0])
    return kernel != (1, 1) or any(p != 0 for p in ([padding] * 2 if isinstance(padding, int) else padding))


def _conv2d(ctx, old, args, kwargs, site, grid: Grid):
    """Scatter the kept cells to a zero grid, convolve as the model does, gather the kept cells back."""
    ranks = ctx.ranks(site, grid.layout)
    dense = ctx.call(ti.scatter_grid, args[0], ranks, grid.height, grid.width, grid.hdim, grid.wdim)
    conv = ctx.graph.call_function(old.target, (dense,) + tuple(args[1:]), kwargs)
    node = ctx.call(ti.gather_grid, conv, ranks, grid.hdim, grid.wdim)
    ctx.state[node] = Pruned(site, info_of(old))
    return node


def _scan_with_gaps(ctx, old, args, kwargs, site):
    tok = info_of(old)
    if isinstance(tok, MultiTok):
        raise UnsupportedModelError(
            f"alignment='decay' is not possible for {old.name}: it scans directions in different token orders in "
            "ONE call (grouped B/C), and the scan's `gap` is shared by all channels. Use alignment='hold'.")
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
