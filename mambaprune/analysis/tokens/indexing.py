"""Rules for what a slice or a select of the token axis means beyond moving data: the slice back
to L tokens after a padded conv1d, a strided downsampling of the grid, a readout of one token.
Everything else they do is data movement (movement.py)."""
from __future__ import annotations

import torch.fx as fx

from ...meta_keys import CONV_LEFT, CONV_SLICE
from ..facts import Fact, Grid, NotUnderstood, PaddedTok, Readout, Tok
from ..ops import aten, argument, is_static, norm_dim
from .context import RuleContext
from .movement import evaluate
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
    if isinstance(x, Grid) and dim in (x.hdim, x.wdim) and is_static(step) and step > 1 and start in (0, 1) \
            and end == size:
        # PatchMerging2D's x[..., 0::2, 1::2, :]: a downsampling, a new stage starts after it
        ctx.barrier(node)
        return None
    if isinstance(x, PaddedTok):
        return _padded(node, ctx, x, dim, start, end, step)
    return evaluate(node, ctx)


def _padded(node: fx.Node, ctx: RuleContext, x: PaddedTok, dim: int, start, end, step) -> Fact:
    """The slice of a padded conv1d output back to L tokens: the conv's window is known."""
    if dim != x.dim:
        return x
    if step != 1 or not is_static(start) or not is_static(end):
        raise NotUnderstood("strided or symbolic slice of the token axis")
    if end - start != x.layout.length:
        raise NotUnderstood("slice of a padded conv1d output to a length other than L")
    ctx.annotate(x.conv, CONV_LEFT, x.padding - start)
    ctx.annotate(node, CONV_SLICE, x.conv)
    return Tok(x.dim, x.layout)


@token_rule(aten.select)
def select(node: fx.Node, ctx: RuleContext) -> Fact:
    """x.select(token_dim, i) reads out one token (protected); any other select moves data."""
    x = ctx.fact(node.args[0])
    shape = ctx.shape(node.args[0])
    dim = norm_dim(argument(node, "dim"), len(shape))
    index = argument(node, "index")
    if isinstance(x, Tok) and dim == x.dim:
        if not is_static(index):
            raise NotUnderstood("select of a symbolic token index")
        position = int(x.layout.path[index])
        ctx.protect([position])
        return Readout("select", position)
    return evaluate(node, ctx)
