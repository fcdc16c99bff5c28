"""Shared state of the pruning rewrite: which tensors are pruned, and the index nodes that serve them.

Each value in the rewritten graph is in one of two states:
- dense: as in the original graph (upstream of the first site, parameters, constants);
- `Pruned(site, tok)`: the token axis `tok.dim` holds the K tokens kept at `site`, sorted along
  `tok.layout` (compiler/layout.py); for a grid (`Grid`) the K kept cells stand along `hdim` (and
  `wdim` has size 1); for directions folded into one tensor (`MultiTok`) part g of the direction
  axis holds the same K tokens sorted along `layouts[g]`.

Index tensors are emitted lazily and cached per (site, layout): the order of a layout's slots, its
inverse, the path ranks of the kept tokens, their original positions. Site 0 is the dense sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ..compiler.layout import Layout
from ..compiler.token_flow import Tok
from ..runtime import token_index as ti

SORTED_MODES = ("none", "hold", "decay")


@dataclass(frozen=True)
class Pruned:
    site: int
    tok: Tok      # or Grid / MultiTok / None (a tuple: its items carry their own)


@dataclass
class SiteNodes:
    keep: int
    sel: fx.Node        # (B, K) identity slots of the previous site that survive
    idx: fx.Node        # (B, K) original positions, identity slot order
    vpos: fx.Node       # (B, K) positions claimed for token mixing


class PruneContext:
    """Builds index nodes in `graph`; `root` receives the constant tables as buffers."""

    def __init__(self, graph: fx.Graph, root: torch.nn.Module, alignment: str, length: int):
        self.graph = graph
        self.root = root
        self.alignment = alignment
        self.length = length
        self.sites: dict = {}
        self.site_order: list = []
        self._cache: dict = {}
        self._constants: dict = {}
        self.state: dict = {}          # new-graph node -> Pruned
        self.identity = Layout.identity(length)

    # -- graph building helpers ----------------------------------------------------------------
    def call(self, fn, *args, **kwargs) -> fx.Node:
        return self.graph.call_function(fn, args, kwargs)

    def constant(self, name: str, value: torch.Tensor) -> fx.Node:
        key = (name, value.dtype, value.numel(), hash(value.cpu().numpy().tobytes()))
        if key not in self._constants:
            serial = len(self._constants)
            while hasattr(self.root, f"_mambaprune_{name}_{serial}"):
                serial += 1
            attr = f"_mambaprune_{name}_{serial}"
            self.root.register_buffer(attr, value, persistent=False)
            self._constants[key] = attr
        return self.graph.get_attr(self._constants[key])

    def rank_table(self, layout: Layout) -> fx.Node:
        return self._cached(("rank", layout), lambda: self.constant("rank", torch.from_numpy(layout.rank.copy())))

    def _cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

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

    # -- per (site, layout) indices ------------------------------------------------------------
    def order(self, site: int, layout: Layout) -> Optional[fx.Node]:
        """(B, K) identity slot held by each slot of `layout`; None means the identity (arange)."""
        if layout == self.identity:
            return None
        if site == 0:
            return self._cached(("path", layout), lambda: self.constant("path", torch.from_numpy(layout.path.copy())))
        return self._cached(("order", site, layout),
                            lambda: self.call(ti.layout_order, self.sites[site].vpos, self.rank_table(layout)))

    def inverse_order(self, site: int, layout: Layout) -> Optional[fx.Node]:
        if layout == self.identity:
            return None
        if site == 0:
            return self.rank_table(layout)
        return self._cached(("inverse", site, layout), lambda: self.call(ti.inverse_order, self.order(site, layout)))

    def in_layout(self, site: int, table: fx.Node, layout: Layout) -> fx.Node:
        order = self.order(site, layout)
        return table if order is None else self._cached(("take", site, table, layout),
                                                        lambda: self.call(ti.take, table, order))

    def ranks(self, site: int, layout: Layout) -> fx.Node:
        """(B, K) increasing path ranks of the slots of a pruned tensor in `layout`."""
        def build():
            claimed = self.call(ti.lookup, self.rank_table(layout), self.sites[site].vpos)
            return self.in_layout(site, claimed, layout)
        return self._cached(("ranks", site, layout), build)

    def positions(self, site: int, layout: Layout) -> fx.Node:
        """(B, K) original positions of the slots of a pruned tensor in `layout`."""
        return self.in_layout(site, self.sites[site].idx, layout)

    def dense_index(self, site: int, layout: Layout) -> fx.Node:
        """Where each pruned slot (in `layout`) sits in a dense tensor of the same layout."""
        def build():
            dense_slot = self.call(ti.lookup, self.rank_table(layout), self.sites[site].idx)
            return self.in_layout(site, dense_slot, layout)
        return self._cached(("dense", site, layout), build)

    def identity_map(self, older: int, site: int) -> fx.Node:
        """(B, K_site) identity slot at `older` of each identity slot at `site`."""
        def build():
            previous = self.previous_site(site)
            sel = self.sites[site].sel
            return sel if previous == older else self.call(ti.take, self.identity_map(older, previous), sel)
        return self._cached(("map", older, site), build)

    def transfer_index(self, older: int, site: int, layout: Layout) -> fx.Node:
        """Index that moves a tensor pruned at `older` (in `layout`) to the tokens kept at `site`."""
        def build():
            if older == 0:
                return self.dense_index(site, layout)
            older_ids = self.identity_map(older, site)
            wanted = self.in_layout(site, older_ids, layout)
            inverse = self.inverse_order(older, layout)
            return wanted if inverse is None else self.call(ti.take, inverse, wanted)
        return self._cached(("transfer", older, site, layout), build)

    def reorder_index(self, site: int, source: Layout, target: Layout) -> Optional[fx.Node]:
        """Index that turns a pruned tensor in `source` layout into the `target` layout."""
        if source == target:
            return None
        def build():
            target_order = self.order(site, target)
            inverse = self.inverse_order(site, source)
            if inverse is None:
                return target_order if target_order is not None else self._arange_like(site)
            if target_order is None:
                return inverse
            return self.call(ti.take, inverse, target_order)
        return self._cached(("reorder", site, source, target), build)

    def _arange_like(self, site: int) -> fx.Node:
        return self.call(ti.compacted_positions, self.sites[site].idx)

