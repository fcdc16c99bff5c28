"""Rules for ops that reduce or normalise over dims: a reduction over the tokens is a readout
(pooling); norms and softmax must stay off the token axis."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..facts import BatchTok, Fact, Grid, MultiTok, NotUnderstood, PaddedTok, Readout, token_dims
from ..ops import aten, argument, norm_dim, op_name
from .context import RuleContext
from .registry import overloads_without_tag, token_rule

_REDUCTIONS = (aten.mean, aten.sum, aten.amax, aten.amin, aten.max, aten.min, aten.std, aten.var, aten.logsumexp,
               aten.prod, aten.norm)
# reductions over the tokens that pool them (a readout the pruned graph computes on the kept tokens)
_POOLING = ("aten::mean", "aten::sum", "aten::amax", "aten::max")


@token_rule(*[overload for packet in _REDUCTIONS for overload in overloads_without_tag(packet, torch.Tag.pointwise)])
def reduction(node: fx.Node, ctx: RuleContext) -> Fact:
    x = ctx.fact(node.args[0])
    ndim = len(ctx.shape(node.args[0]))
    dims = argument(node, "dim", None)
    dims = list(range(ndim)) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
    dims = [norm_dim(d, ndim) for d in dims]
    tokens = token_dims(x)
    if isinstance(x, MultiTok) and x.gdim in dims and x.dim not in dims:
        raise NotUnderstood(f"{op_name(node)} over directions folded into one tensor (parts in different orders)")
    if any(d in dims for d in tokens):
        if isinstance(x, (BatchTok, PaddedTok)):
            raise NotUnderstood(f"{op_name(node)} over flattened batch x tokens")
        if isinstance(x, Grid) and not all(d in dims for d in tokens):
            raise NotUnderstood("reduction over one axis of the token grid")
        if op_name(node) not in _POOLING:
            raise NotUnderstood(f"{op_name(node)} over the token axis")
        if _where_read(node):
            raise NotUnderstood(f"{op_name(node)} over the token axis whose positions are read")
        return Readout("pool")
    if argument(node, "keepdim", False):
        return x
    for d in sorted(dims, reverse=True):
        x = x.without_dim(d) if x is not None else None
    return x


def _where_read(node: fx.Node) -> bool:
    """Whether the model reads the second result of max pooling `node` (where the maximum is): a position
    among the kept tokens if the max ran on them, so the tokens are restored before it."""
    return any(u.target is operator.getitem and u.args[1] == 1 and u.users for u in node.users)


@token_rule(aten.layer_norm, aten.rms_norm, aten.native_layer_norm)
def norm_over_last_dims(node: fx.Node, ctx: RuleContext) -> Fact:
    x = ctx.fact(node.args[0])
    normalized = len(argument(node, "normalized_shape"))
    ndim = len(ctx.shape(node.args[0]))
    if any(d >= ndim - normalized for d in token_dims(x)):
        raise NotUnderstood(f"{op_name(node)} normalises over the token axis")
    if isinstance(x, MultiTok) and x.gdim >= ndim - normalized:
        raise NotUnderstood(f"{op_name(node)} normalises over directions folded into one tensor")
    return x


@token_rule(aten.batch_norm, aten._native_batch_norm_legit_no_training, aten.instance_norm)
def norm_over_channels(node: fx.Node, ctx: RuleContext) -> Fact:
    x = ctx.fact(node.args[0])
    if 1 in token_dims(x):
        raise NotUnderstood(f"{op_name(node)} over the token axis as channels")
    return x


@token_rule(aten.softmax, aten._softmax, aten.log_softmax)
def softmax(node: fx.Node, ctx: RuleContext) -> Fact:
    x = ctx.fact(node.args[0])
    dim = norm_dim(argument(node, "dim"), len(ctx.shape(node)))
    if dim in token_dims(x):
        raise NotUnderstood("softmax over the token axis")
    if isinstance(x, MultiTok) and dim == x.gdim:
        raise NotUnderstood("softmax over directions folded into one tensor")
    return x


@token_rule(aten.adaptive_avg_pool2d, aten.adaptive_max_pool2d, aten.adaptive_avg_pool1d)
def adaptive_pool(node: fx.Node, ctx: RuleContext) -> Fact:
    """A global pool of the token grid (VMamba's classifier: AdaptiveAvgPool2d(1)) reads out the tokens."""
    x = ctx.fact(node.args[0])
    ndim = len(ctx.shape(node.args[0]))
    size = argument(node, "output_size")
    size = [size] if isinstance(size, int) else list(size)
    if x is None:
        return None
    if not any(d >= ndim - len(size) for d in token_dims(x)):
        return x
    global_pool = all(s == 1 for s in size)
    over_all = isinstance(x, Grid) and len(size) == 2 and (x.hdim, x.wdim) == (ndim - 2, ndim - 1)
    over_seq = not isinstance(x, (Grid, MultiTok, BatchTok, PaddedTok)) and len(size) == 1 and x.dim == ndim - 1
    if not global_pool or not (over_all or over_seq):
        raise NotUnderstood(f"{op_name(node)} to {tuple(size)} on the token axis (only a global pool of all the "
                            "tokens is a readout)")
    if _where_read(node):
        raise NotUnderstood(f"{op_name(node)} of the tokens whose positions are read")
    return Readout("pool")
