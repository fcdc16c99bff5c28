"""Rules for convolutions over the tokens: a depthwise conv1d along the token axis, and a conv2d
on the token grid (a strided one that changes the grid ends a stage: a barrier for the sites)."""
from __future__ import annotations

import torch.fx as fx

from ...meta_keys import CONV_LEFT
from ..facts import Fact, Grid, MultiTok, NotUnderstood, PaddedTok, Tok
from ..ops import aten, argument
from .context import RuleContext
from .registry import token_rule


def _pointwise_conv1d(node: fx.Node, ctx: RuleContext, x) -> Fact:
    """A kernel-1 conv1d is a linear layer over the channels of each token (VMamba's v05 x_proj:
    one group per direction); on folded directions every group must lie inside one direction."""
    groups = argument(node, "groups", 1)
    if isinstance(x, MultiTok):
        if x.gdim != x.dim - 1:
            raise NotUnderstood("a kernel-1 conv1d over directions folded into an axis other than the channels")
        if groups % len(x.layouts):
            raise NotUnderstood(f"a kernel-1 conv1d whose {groups} groups mix the {len(x.layouts)} directions "
                                "folded into its channels")
        x.part_size(ctx.shape(node.args[0])[x.gdim])
        return x
    return Tok(x.dim, x.layout)


def _is_pointwise(node: fx.Node, ctx: RuleContext) -> bool:
    weight = ctx.shape(argument(node, "weight"))
    stride, padding, dilation = (argument(node, name, default) for name, default in
                                 (("stride", [1]), ("padding", [0]), ("dilation", [1])))
    return (weight is not None and weight[-1] == 1 and list(stride) == [1] and list(dilation) == [1]
            and padding in ([0], (0,), "valid", "same"))


@token_rule(aten.conv1d)
def conv1d(node: fx.Node, ctx: RuleContext) -> Fact:
    """A depthwise, stride-1 conv1d along the last (token) axis; padded beyond L tokens until a
    slice brings it back (indexing.slice). A kernel-1 conv1d mixes channels only."""
    x = ctx.fact(node.args[0])
    on_tokens = isinstance(x, (Tok, MultiTok)) and x.dim == len(ctx.shape(node.args[0])) - 1
    if on_tokens and _is_pointwise(node, ctx):
        return _pointwise_conv1d(node, ctx, x)
    if isinstance(x, MultiTok):
        raise NotUnderstood("conv1d along directions folded into one tensor (parts in different orders)")
    if not isinstance(x, Tok) or x.dim != len(ctx.shape(node.args[0])) - 1:
        raise NotUnderstood("conv1d over a non-token axis of a token tensor")
    stride, padding, dilation = (argument(node, name, default) for name, default in
                                 (("stride", [1]), ("padding", [0]), ("dilation", [1])))
    weight = argument(node, "weight")
    if padding == "same":
        padding = [(ctx.shape(weight)[-1] - 1) // 2]   # PyTorch's left pad for 'same'
    if isinstance(padding, str) or list(stride) != [1] or list(dilation) != [1]:
        raise NotUnderstood("conv1d along the tokens with stride/dilation/'valid' padding")
    channels = ctx.shape(node.args[0])[-2]
    if argument(node, "groups", 1) != channels or ctx.shape(weight)[0] != channels:
        raise NotUnderstood("conv1d along the tokens that is not depthwise")
    pad = padding[0]
    if ctx.shape(node)[-1] == x.layout.length:
        ctx.annotate(node, CONV_LEFT, pad)
        return Tok(x.dim, x.layout)
    return PaddedTok(x.dim, x.layout, pad, node.name)


@token_rule(aten.conv2d)
def conv2d(node: fx.Node, ctx: RuleContext) -> Fact:
    x = ctx.fact(node.args[0])
    if not isinstance(x, Grid) or (x.hdim, x.wdim) != (2, 3):
        raise NotUnderstood("conv2d over something other than the (B, C, H, W) token grid")
    out = ctx.shape(node)
    if (out[2], out[3]) != (x.height, x.width):
        # a new stage: its tokens start afresh; no site may lie before this node (analysis/sites.py)
        ctx.barrier(node)
        return None
    if list(argument(node, "stride", [1, 1])) not in ([1], [1, 1]):
        raise NotUnderstood("strided conv2d on the token grid")
    return x


@token_rule(aten.im2col)
def im2col(node: fx.Node, ctx: RuleContext) -> Fact:
    """nn.Unfold on the (B, C, H, W) token grid. When its blocks do not correspond one to one with the
    grid's cells (mmpretrain's PatchMerging: 2x2 blocks, stride 2) it is a downsampling, like a strided
    conv2d: a new stage starts after it. One that keeps the cell count gathers each cell's neighbours
    into its channels, which the rewrite does not follow."""
    x = ctx.fact(node.args[0])
    if not isinstance(x, Grid) or (x.hdim, x.wdim) != (2, 3) or len(ctx.shape(node.args[0])) != 4:
        raise NotUnderstood("im2col (nn.Unfold) over something other than the (B, C, H, W) token grid")
    if ctx.shape(node)[-1] != x.height * x.width:
        ctx.barrier(node)
        return None
    raise NotUnderstood("im2col (nn.Unfold) that keeps every cell of the token grid: each block reads its "
                        "neighbours, which the rewrite does not follow")
