"""Merge: under reduction="merge-*" the tokens a site prunes are averaged into kept tokens, not dropped.

Invariant: emits nodes only. After the selection of site s (select.py) `emit_merge` emits the pruned
slots, each one's target (the nearest kept token in the original positions: cell distance where the
positions are the cells of a grid, position distance on a sequence, `grid_width`; or the most similar
by cosine of the stream crossing the site) and the tokens' sizes, recorded as the site's `SiteMerge`;
gather.py (`merged`) then cuts the stream's parts (ViM's hidden and residual, PlainMamba's x) with
`token_merge.merge_tokens` instead of a gather. The merged value is linear in the stream, so
merging every part with the same weights merges their sum. Sizes chain through the sites of a stage
(ToMe's proportional averaging); a new stage starts at size 1. Protected tokens (class tokens, read
positions) are never a target: they stay exactly what they were.

    drop:   x (P) -> gather(sel) -> K
    merge:  x (P) -> (s * x)[sel] + scatter_add(target, (s * x)[pruned]) -> / size -> K

Restoring pruned tokens with fill="carry" under a merge is ToMe's unmerge (`unmerged`): a pruned
position takes the final value of the kept token it was merged into (followed through later sites).
The stream must cross the site in token order (its identity layout); a model whose stream crosses in
another order, or as several tensors that are not one stream, is refused with reduction="drop" as the
way out.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ..analysis import Grid, Tok, fact_of
from ..errors import UnsupportedModelError
from ..runtime import token_index as ti
from ..runtime import token_merge as tm
from ..settings import Reduction
from .context import SiteContext
from .gather import summed_stream
from .state import SiteMerge, SiteNodes


def emit_merge(ctx: SiteContext, nodes: SiteNodes, parts: list) -> None:
    """Record how site `ctx.site` merges (nothing under reduction="drop")."""
    reduction = ctx.settings.reduction
    if not reduction.merges:
        return
    fact = stream_fact(ctx, parts)
    tables = ctx.tables
    previous = tables.previous_site(ctx.site)
    length = tables.length if previous == 0 else tables.sites[previous].keep
    pruned = ctx.call(tm.pruned_slots, nodes.sel, length)
    protected = ctx.builder.constant("protected", torch.tensor(sorted(ctx.analysis.protected), dtype=torch.int64))
    if reduction is Reduction.MERGE_NEAREST:
        coords = ctx.builder.constant("coords", position_coordinates(fact, grid_width(ctx, fact)))
        target = ctx.call(tm.nearest_targets, nodes.prev_idx, nodes.sel, pruned, coords, protected)
    else:
        stream = summed_stream(ctx, parts, previous, fp32=True)
        if isinstance(fact, Grid) and previous == 0:
            stream, dim = ctx.call(tm.grid_stream, stream, fact.hdim, fact.wdim), -1
        else:
            dim = fact.hdim if isinstance(fact, Grid) else fact.dim
        target = ctx.call(tm.similar_targets, stream, dim, nodes.prev_idx, nodes.sel, pruned, protected)
    size = tables.merges[previous].merged_size if previous else None
    merged_size = ctx.call(tm.merged_sizes, size, nodes.sel, pruned, target)
    tables.merges[ctx.site] = SiteMerge(frozenset(parts), pruned, target, size, merged_size)


def stream_fact(ctx: SiteContext, parts: list):
    """The fact of the stream crossing the site, or a refusal naming why it cannot be merged."""
    how = f"reduction='{ctx.settings.reduction}' at the site after block {ctx.site}"
    if not parts:
        raise UnsupportedModelError(f"{how}: the tensors crossing the site are not one token stream, so there is "
                                    "no value to merge. Use reduction='drop'.")
    fact = fact_of(parts[0])
    if not isinstance(fact, (Tok, Grid)) or fact.layout != ctx.tables.identity:
        raise UnsupportedModelError(f"{how}: the stream {parts[0].name} crosses the site in another token order "
                                    "than the original one; merging is defined in token order only. "
                                    "Use reduction='drop'.")
    return fact


def grid_width(ctx: SiteContext, fact):
    """The width of the grid whose cells (row-major) are the stream's positions: a Grid stream's own; for a
    token sequence, the grid some token mixer of the model sees it as (PlainMamba's conv2d), when one of the
    sequence's length in token order exists; else None (a sequence with a class token among the patches,
    as ViM's, is no grid: its neighbours are by position)."""
    if isinstance(fact, Grid):
        return fact.width
    widths = {f.width for f in map(fact_of, ctx.analysis.gm.graph.nodes)
              if isinstance(f, Grid) and f.layout == fact.layout}
    return widths.pop() if len(widths) == 1 else None


def position_coordinates(fact, width=None) -> torch.Tensor:
    """(L, c) float32 coordinates of every original position: (row, column) on a grid `width` cells wide,
    the position itself on a sequence (width None)."""
    positions = np.arange(fact.layout.length)
    if width is not None:
        return torch.from_numpy(np.stack([positions // width, positions % width], axis=1).astype(np.float32))
    return torch.from_numpy(positions.astype(np.float32)).unsqueeze(1)


def unmerged(ctx: SiteContext, value: fx.Node, state) -> fx.Node:
    """ToMe's unmerge: the pruned `value` at full length, every position holding the value of the kept token
    it ended in (its own when kept)."""
    tables, fact = ctx.tables, state.fact
    owner = None
    for key in tables.sites_up_to(state.site):
        assignment = ctx.cached(("assignment", key), lambda key=key: ctx.call(
            tm.merge_assignment, tables.sites[key].sel, tables.merges[key].pruned, tables.merges[key].target))
        owner = assignment if owner is None else ctx.call(ti.take, assignment, owner)
    if fact.layout != tables.identity:   # identity slot -> the slot of the value's layout; dense slots in layout order
        owner = ctx.call(ti.take, tables.inverse_order(state.site, fact.layout),
                         ctx.call(_columns, owner, tables.path_table(fact.layout)))
    if isinstance(fact, Grid):
        return ctx.call(tm.unmerge_grid, value, owner, fact.height, fact.width, fact.hdim, fact.wdim)
    return ctx.call(ti.gather_tokens, value, owner, fact.dim)


def _columns(table, path):
    """table[:, path] for a (B, L) table and a constant (L,) path."""
    return table[:, path.to(table.device)]
