"""Conv1d: a depthwise conv1d along the tokens sees each kept token's neighbours where the
alignment says they are.

Invariant: on the kept tokens, the result equals the conv1d of the alignment's definition with
the kept tokens at their claimed path ranks (`vpos`): a pruned neighbour contributes 0
(`pos_conv1d`). The slice that brought a padded conv1d back to L tokens is dropped: pos_conv1d
returns K tokens already.
"""
from __future__ import annotations

import torch.fx as fx

from ...analysis.ops import call_argument, op_name
from ...meta_keys import CONV_LEFT, CONV_SLICE
from ...runtime import pos_conv1d
from ..context import SiteContext
from .base import RewriteRule, pruned_input


class DropConvSlice(RewriteRule):
    def matches(self, ctx: SiteContext, old: fx.Node, args: tuple) -> bool:
        return CONV_SLICE in old.meta

    def emit(self, ctx: SiteContext, old: fx.Node, args: tuple, kwargs: dict) -> fx.Node:
        return args[0]


class PositionConv1d(RewriteRule):
    def matches(self, ctx: SiteContext, old: fx.Node, args: tuple) -> bool:
        return op_name(old) == "aten::conv1d" and CONV_LEFT in old.meta and pruned_input(ctx, args) is not None

    def emit(self, ctx: SiteContext, old: fx.Node, args: tuple, kwargs: dict) -> fx.Node:
        state = pruned_input(ctx, args)
        weight, bias = (call_argument(old.target, args, kwargs, name) for name in ("weight", "bias"))
        ranks = ctx.tables.ranks(ctx.site, state.fact.layout)
        node = ctx.call(pos_conv1d, args[0], weight, bias, ranks, old.meta[CONV_LEFT])
        return ctx.state.mark(node, ctx.site, state.fact)

