"""Rules for ops that read parts of a tensor: slices, selects, flips and constant-index gathers
(a gather by a constant permutation of the tokens is a new layout; meta_keys.PERMUTATION)."""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from ...meta_keys import CONV_LEFT, CONV_SLICE, PERMUTATION
from ..facts import Fact, Grid, MultiTok, NotUnderstood, PaddedTok, Readout, Tok
from ..layout import Layout
from ..ops import aten, argument, is_static, norm_dim
from .context import RuleContext
from .registry import token_rule


@token_rule(aten.slice)
def slice_(node: fx.Node, ctx: RuleContext) -> Fact:
    x = ctx.fact(node.args[0])
    shape = ctx.shape(node.args[0])
    dim = norm_dim(argument(node, "dim", 0), len(shape))
    start = argument(node, "start", None) or 0
    end = argument(node, "end", None)
    step = argument(node, "step", 1)
    size = shape[dim]
    end = size if end is None or (is_static(end) and end > size) else end
    token_dim = getattr(x, "dim", None) if not isinstance(x, Grid) else None
    if isinstance(x, Grid) and dim in (x.hdim, x.wdim):
        if is_static(step) and step > 1 and start in (0, 1) and end == size:
            # PatchMerging2D's x[..., 0::2, 1::2, :]: a downsampling, a new stage starts after it
            ctx.barrier(node)
            return None
        raise NotUnderstood("slice of the token grid")
    if isinstance(x, MultiTok) and dim == x.gdim:
        if step != 1 or not is_static(start) or not is_static(end):
            raise NotUnderstood("strided or symbolic slice of directions folded into one tensor")
        return x.parts(start, end, size)
    if dim != token_dim:
        return x
    if step != 1 or not is_static(start) or not is_static(end):
        raise NotUnderstood("strided or symbolic slice of the token axis")
    if isinstance(x, PaddedTok):
        if end - start != x.layout.length:
            raise NotUnderstood("slice of a padded conv1d output to a length other than L")
        ctx.annotate(x.conv, CONV_LEFT, x.padding - start)
        ctx.annotate(node, CONV_SLICE, x.conv)
        return Tok(x.dim, x.layout)
    if start == 0 and end == size:
        return x
    raise NotUnderstood(f"slice [{start}:{end}] of the token axis (only whole-axis slices are understood)")


@token_rule(aten.select)
def select(node: fx.Node, ctx: RuleContext) -> Fact:
    """x.select(dim, i): a part of folded directions, a readout of one token, or a dim dropped."""
    x = ctx.fact(node.args[0])
    shape = ctx.shape(node.args[0])
    dim = norm_dim(argument(node, "dim"), len(shape))
    index = argument(node, "index")
    if isinstance(x, MultiTok):
        return x.selected(dim, index, shape[dim])
    if isinstance(x, Tok) and dim == x.dim:
        if not is_static(index):
            raise NotUnderstood("select of a symbolic token index")
        position = int(x.layout.path[index])
        ctx.protect([position])
        return Readout("select", position)
    if isinstance(x, Grid) and dim in (x.hdim, x.wdim):
        raise NotUnderstood("select of a grid row or column")
    return x.without_dim(dim) if x is not None else None


@token_rule(aten.flip)
def flip(node: fx.Node, ctx: RuleContext) -> Fact:
    dims = [norm_dim(d, len(ctx.shape(node))) for d in argument(node, "dims")]
    return ctx.fact(node.args[0]).flipped(dims)


@token_rule(aten.index)
def index(node: fx.Node, ctx: RuleContext) -> Fact:
    """x[..., perm, ...] with a constant permutation of the tokens."""
    x = ctx.fact(node.args[0])
    indices = list(argument(node, "indices"))
    if not isinstance(x, Tok):
        raise NotUnderstood("indexing of the token grid")
    used = [d for d, i in enumerate(indices) if i is not None]
    if used != [x.dim]:
        raise NotUnderstood("advanced indexing that touches more than the token axis")
    return Tok(x.dim, permuted(x.layout, ctx.constant(indices[x.dim]), node, ctx))


@token_rule(aten.index_select)
def index_select(node: fx.Node, ctx: RuleContext) -> Fact:
    x = ctx.fact(node.args[0])
    dim = norm_dim(argument(node, "dim"), len(ctx.shape(node)))
    if isinstance(x, MultiTok):
        if dim in (x.dim, x.gdim):
            raise NotUnderstood("index_select of the token or direction axis of directions folded into one tensor")
        return x
    if not isinstance(x, Tok):
        raise NotUnderstood("index_select on the token grid")
    if dim != x.dim:
        return x
    return Tok(x.dim, permuted(x.layout, ctx.constant(argument(node, "index")), node, ctx))


def permuted(layout: Layout, perm: np.ndarray, node: fx.Node, ctx: RuleContext) -> Layout:
    """The layout after gathering slots `perm`, which must be a permutation of all tokens."""
    if len(perm) != layout.length or not np.array_equal(np.sort(perm), np.arange(layout.length)):
        raise NotUnderstood("a constant token gather that is not a permutation of all tokens")
    ctx.annotate(node, PERMUTATION, perm)
    return layout.permuted(perm)
