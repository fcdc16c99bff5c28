"""Which values of the rewritten graph are pruned, and at which site.

Each value in the rewritten graph is in one of two states:
- dense: as in the original graph (upstream of the first site, parameters, constants);
- `Pruned(site, fact)`: the token axis of `fact` holds the K tokens kept at `site`, sorted along
  its layout (analysis/layout.py); for a grid (`Grid`) the K kept cells stand along `hdim` (and
  `wdim` has size 1); for directions folded into one tensor (`MultiTok`) part g of the direction
  axis holds the same K tokens sorted along `layouts[g]`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.fx as fx


@dataclass(frozen=True)
class Pruned:
    site: int
    fact: object      # Tok / Grid / MultiTok / BatchTok, or None for a tuple (its items carry their own)


@dataclass
class SiteNodes:
    keep: int
    sel: fx.Node        # (B, K) identity slots of the previous site that survive
    idx: fx.Node        # (B, K) original positions, identity slot order
    vpos: fx.Node       # (B, K) positions claimed for token mixing
    prev_idx: Optional[fx.Node] = None   # (B, P) original positions of the previous site's tokens


@dataclass
class SiteMerge:
    """How a site merges its pruned tokens (rewrite/merge.py, runtime/token_merge.py)."""

    parts: frozenset    # old-graph nodes of the stream crossing the site: merged instead of gathered
    pruned: fx.Node     # (B, P - K) pruned slots of the previous site
    target: fx.Node     # (B, P - K) kept slot each one is merged into
    size: Optional[fx.Node]   # (B, P) sizes before the merge (None: all 1)
    merged_size: fx.Node      # (B, K) sizes after it


class PrunedState:
    """new-graph node -> Pruned, for the values that hold pruned tokens."""

    def __init__(self):
        self._pruned: dict = {}

    def of(self, value) -> Optional[Pruned]:
        return self._pruned.get(value) if isinstance(value, fx.Node) else None

    def mark(self, node: fx.Node, site: int, fact) -> fx.Node:
        self._pruned[node] = Pruned(site, fact)
        return node

    def copy_to(self, node: fx.Node, source: fx.Node) -> fx.Node:
        self._pruned[node] = self._pruned[source]
        return node
