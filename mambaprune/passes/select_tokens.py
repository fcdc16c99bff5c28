"""Select: per-sample top-K tokens at a site; emits the site's `sel`, `idx` and `vpos` (B, K).

Invariant: emits nodes only. Protected positions (class tokens, positions read out by a constant
index) are always kept. Kept slots are sorted by original position except under `none-unsorted`
(EViT-style top-k order). `idx` holds original positions; `vpos` the positions the kept tokens claim
for token mixing: `idx` under hold/decay, 0..K-1 under the ViT-style `none` modes.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..runtime import token_index as ti
from .token_state import SORTED_MODES, PruneContext, SiteNodes

KEPT_POSITIONS_KEY = "mambaprune.kept_positions"


def emit_selection(ctx: PruneContext, site: int, scores: fx.Node, reference: fx.Node, token_dim: int,
                   keep: int, protected: set) -> SiteNodes:
    previous = ctx.latest_site()
    if previous == 0:
        prev_idx = ctx.call(ti.initial_positions, reference, token_dim)
    else:
        prev_idx = ctx.sites[previous].idx
    protected_table = ctx.constant("protected", torch.tensor(sorted(protected), dtype=torch.int64))
    sel = ctx.call(ti.select_tokens, scores, prev_idx, protected_table, keep, ctx.alignment in SORTED_MODES)
    idx = ctx.call(ti.take, prev_idx, sel)
    idx.meta[KEPT_POSITIONS_KEY] = site  # PrunedModel.kept_positions reads these back
    vpos = idx if ctx.alignment in ("hold", "decay") else ctx.call(ti.compacted_positions, idx)
    nodes = SiteNodes(keep, sel, idx, vpos)
    ctx.add_site(site, nodes)
    return nodes
