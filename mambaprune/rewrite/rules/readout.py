"""Readout: constant-index reads of the token axis follow their token; token outputs are restored.

Invariant: `x[:, i]` on a pruned tensor reads, per sample, the slot that now holds the token the
dense graph read at i (a protected token, so always kept). Pooling over the tokens needs no rewrite:
it pools the kept tokens. (A graph output that still carries tokens is restored to full length:
rewrite/restore.py.)
"""
from __future__ import annotations

import torch.fx as fx

from ...analysis import Readout, fact_of
from ...analysis.ops import op_name
from ...runtime import token_index as ti
from ..context import SiteContext
from .base import RewriteRule, pruned_input


class RemapReadout(RewriteRule):
    """x.select(token_dim, i) of a pruned tensor -> a per-sample read of the slot holding position i."""

    def matches(self, ctx: SiteContext, old: fx.Node, args: tuple) -> bool:
        return op_name(old) == "aten::select" and isinstance(fact_of(old), Readout) \
            and pruned_input(ctx, args) is not None

    def emit(self, ctx: SiteContext, old: fx.Node, args: tuple, kwargs: dict) -> fx.Node:
        state = pruned_input(ctx, args)
        positions = ctx.tables.positions(ctx.site, state.fact.layout)
        slot = ctx.call(ti.slot_of_position, positions, fact_of(old).position)
        return ctx.call(ti.read_slot, args[0], slot, state.fact.dim)
