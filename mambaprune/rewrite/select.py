"""Select: per-sample top-K tokens at a site; emits the site's `sel`, `idx` and `vpos` (B, K).

Invariant: emits nodes only. Protected positions (class tokens, positions read out by a constant
index) are always kept. Kept slots are sorted by original position except under `none-unsorted`
(EViT-style top-k order). `idx` holds original positions; `vpos` the positions the kept tokens claim
for token mixing: `idx` under hold/decay, 0..K-1 under the ViT-style `none` modes.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..meta_keys import KEPT_POSITIONS
from ..runtime import token_index as ti
from .context import SiteContext
from .state import SiteNodes


def emit_selection(ctx: SiteContext, scores: fx.Node, reference: fx.Node, token_dim: int, keep: int,
                   protected: set) -> SiteNodes:
    tables, alignment = ctx.tables, ctx.settings.alignment
    previous = tables.latest_site()
    if previous == 0:
        prev_idx = ctx.call(ti.initial_positions, reference, token_dim)
    else:
        prev_idx = tables.sites[previous].idx
    protected_table = ctx.builder.constant("protected", torch.tensor(sorted(protected), dtype=torch.int64))
    sel = ctx.call(ti.select_tokens, scores, prev_idx, protected_table, keep, alignment.keeps_order)
    idx = ctx.call(ti.take, prev_idx, sel)
    idx.meta[KEPT_POSITIONS] = ctx.site  # read back by run_recording_kept
    vpos = idx if alignment.claims_positions else ctx.call(ti.compacted_positions, idx)
    nodes = SiteNodes(keep, sel, idx, vpos, prev_idx)
    tables.add_site(ctx.site, nodes)
    return nodes


def run_recording_kept(pruned: fx.GraphModule, flat: list) -> tuple:
    """(the pruned graph's output on the flat inputs, {site: (B, K) original positions kept there}): the
    graph run eagerly, the `idx` of every site recorded as it is computed."""
    wanted = {n: n.meta[KEPT_POSITIONS] for n in pruned.graph.nodes if KEPT_POSITIONS in n.meta}
    kept = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node in wanted:
                kept[wanted[node]] = value
            return value

    return Recorder(pruned).run(*flat), kept
