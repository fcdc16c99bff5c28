"""Scan gaps: under alignment="decay", every selective scan also decays its state across the gaps.

Invariant: the scan receives `gap` (B, K) = path steps between consecutive kept tokens, so
h_k = exp(g_k * delta_k * A) h_{k-1} + delta_k B_k u_k (DESIGN.md). A scan that folds directions
in different orders into one call cannot: its gap would differ per channel group.
"""
from __future__ import annotations

import torch.fx as fx

from ...analysis import MultiTok, fact_of
from ...analysis.ops import is_scan, with_argument
from ...errors import UnsupportedModelError
from ...runtime import token_index as ti
from ...settings import Alignment
from ..context import SiteContext
from .base import RewriteRule


class ScanGaps(RewriteRule):
    def matches(self, ctx: SiteContext, old: fx.Node, args: tuple) -> bool:
        return is_scan(old) and ctx.settings.alignment is Alignment.DECAY

    def emit(self, ctx: SiteContext, old: fx.Node, args: tuple, kwargs: dict) -> fx.Node:
        fact = fact_of(old)
        if isinstance(fact, MultiTok):
            raise UnsupportedModelError(
                f"alignment='decay' is not possible for {old.name}: it scans directions in different token orders "
                "in ONE call (grouped B/C), and the scan's `gap` is shared by all channels. Use alignment='hold'.")
        gap = ctx.call(ti.path_gaps, ctx.tables.ranks(ctx.site, fact.layout))
        args, kwargs = with_argument(old.target, tuple(args), dict(kwargs), "gap", gap)
        return ctx.state.mark(ctx.graph.call_function(old.target, args, kwargs), ctx.site, fact)
