"""The index tensors a stage's sites need, emitted lazily and shared by every user.

Vocabulary (runtime/token_index.py): at site s every sample keeps K tokens; `idx` (B, K) are their
original positions in identity slot order, `vpos` (B, K) the positions they claim for token
mixing. A tensor in layout `path` holds the kept tokens sorted by their rank along `path`. Site 0
is the dense sequence. One `IndexTables` per stage of the model (its own token count and chain of
sites); tables are cached per (site, layout) in the builder.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from ..analysis import Layout
from ..runtime import token_index as ti
from .builder import GraphBuilder
from .state import SiteNodes


class IndexTables:
    def __init__(self, builder: GraphBuilder, length: int):
        self.builder = builder
        self.length = length
        self.identity = Layout.identity(length)
        self.sites: dict = {}         # site key -> SiteNodes
        self.merges: dict = {}        # site key -> SiteMerge (reduction="merge-*")
        self.site_order: list = []

    # -- sites -------------------------------------------------------------------------------
    def add_site(self, site: int, nodes: SiteNodes) -> None:
        self.sites[site] = nodes
        self.site_order.append(site)

    def latest_site(self) -> int:
        """The last site added so far (0: none yet, the dense sequence)."""
        return self.site_order[-1] if self.site_order else 0

    def previous_site(self, site: int) -> int:
        position = self.site_order.index(site)
        return self.site_order[position - 1] if position else 0

    def sites_up_to(self, site: int) -> list:
        return self.site_order[:self.site_order.index(site) + 1]

    # -- constant tables -------------------------------------------------------------------------
    def _cached(self, key, build):
        return self.builder.cached(key, build)

    def _call(self, fn, *args) -> fx.Node:
        return self.builder.call(fn, *args)

    def rank_table(self, layout: Layout) -> fx.Node:
        """rank[p] = the slot of `layout` that holds original position p."""
        return self._cached(("rank", layout), lambda: self.builder.constant("rank", torch.from_numpy(layout.rank.copy())))

    def path_table(self, layout: Layout) -> fx.Node:
        return self._cached(("path", layout), lambda: self.builder.constant("path", torch.from_numpy(layout.path.copy())))

    # -- per (site, layout) indices ----------------------------------------------------------------
    def order(self, site: int, layout: Layout) -> Optional[fx.Node]:
        """(B, K) identity slot held by each slot of `layout`; None means the identity (arange)."""
        if layout == self.identity:
            return None
        if site == 0:
            return self.path_table(layout)
        return self._cached(("order", site, layout),
                            lambda: self._call(ti.layout_order, self.sites[site].vpos, self.rank_table(layout)))

    def inverse_order(self, site: int, layout: Layout) -> Optional[fx.Node]:
        if layout == self.identity:
            return None
        if site == 0:
            return self.rank_table(layout)
        return self._cached(("inverse", site, layout), lambda: self._call(ti.inverse_order, self.order(site, layout)))

    def in_layout(self, site: int, table: fx.Node, layout: Layout) -> fx.Node:
        """A (B, K) per-token table in identity slot order, reordered to the slots of `layout`."""
        order = self.order(site, layout)
        return table if order is None else self._cached(("take", site, table, layout),
                                                        lambda: self._call(ti.take, table, order))

    def ranks(self, site: int, layout: Layout) -> fx.Node:
        """(B, K) increasing path ranks of the slots of a pruned tensor in `layout`."""
        def build():
            claimed = self._call(ti.lookup, self.rank_table(layout), self.sites[site].vpos)
            return self.in_layout(site, claimed, layout)
        return self._cached(("ranks", site, layout), build)

    def positions(self, site: int, layout: Layout) -> fx.Node:
        """(B, K) original positions of the slots of a pruned tensor in `layout`."""
        return self.in_layout(site, self.sites[site].idx, layout)

    def dense_index(self, site: int, layout: Layout) -> fx.Node:
        """Where each pruned slot (in `layout`) sits in a dense tensor of the same layout."""
        def build():
            dense_slot = self._call(ti.lookup, self.rank_table(layout), self.sites[site].idx)
            return self.in_layout(site, dense_slot, layout)
        return self._cached(("dense", site, layout), build)

    def identity_map(self, older: int, site: int) -> fx.Node:
        """(B, K_site) identity slot at `older` of each identity slot at `site`."""
        def build():
            previous = self.previous_site(site)
            sel = self.sites[site].sel
            return sel if previous == older else self._call(ti.take, self.identity_map(older, previous), sel)
        return self._cached(("map", older, site), build)

    def transfer_index(self, older: int, site: int, layout: Layout) -> fx.Node:
        """Index that moves a tensor pruned at `older` (in `layout`) to the tokens kept at `site`."""
        def build():
            if older == 0:
                return self.dense_index(site, layout)
            wanted = self.in_layout(site, self.identity_map(older, site), layout)
            inverse = self.inverse_order(older, layout)
            return wanted if inverse is None else self._call(ti.take, inverse, wanted)
        return self._cached(("transfer", older, site, layout), build)

    def reorder_index(self, site: int, source: Layout, target: Layout) -> Optional[fx.Node]:
        """Index that turns a pruned tensor in `source` layout into the `target` layout."""
        if source == target:
            return None

        def build():
            target_order = self.order(site, target)
            inverse = self.inverse_order(site, source)
            if inverse is None:
                return target_order if target_order is not None else self._call(ti.compacted_positions,
                                                                                 self.sites[site].idx)
            if target_order is None:
                return inverse
            return self._call(ti.take, inverse, target_order)
        return self._cached(("reorder", site, source, target), build)
