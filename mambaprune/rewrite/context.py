"""What the rewrite's steps share: the builder, the pruned-state map, each stage's index tables,
the settings and the analysis; `RewriteContext.at(site)` is the view one region's nodes use."""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..analysis import GraphAnalysis
from ..settings import PruneSettings
from .builder import GraphBuilder
from .indices import IndexTables
from .state import PrunedState


class RewriteContext:
    def __init__(self, source: fx.GraphModule, analysis: GraphAnalysis, site_keys: list, settings: PruneSettings):
        self.builder = GraphBuilder(source)
        self.state = PrunedState()
        self.analysis = analysis
        self.settings = settings
        self.env: dict = {}             # old node -> new node
        self.restorations: list = []    # restore.Restoration, for the report
        self._tables: dict = {}
        current, previous = None, None
        for key in site_keys:          # one IndexTables per stage: consecutive sites of one stage
            if current is None or not analysis.same_stage(previous, key):
                current = IndexTables(self.builder, analysis.site_length(key))
            self._tables[key], previous = current, key

    def at(self, site: int) -> "SiteContext":
        return SiteContext(self, site)

    def tables(self, site: int) -> IndexTables:
        return self._tables[site]


@dataclass
class SiteContext:
    """The rewrite as seen by the nodes of one region (downstream of `site`)."""

    rewrite: RewriteContext
    site: int

    @property
    def builder(self) -> GraphBuilder:
        return self.rewrite.builder

    @property
    def graph(self) -> fx.Graph:
        return self.rewrite.builder.graph

    @property
    def state(self) -> PrunedState:
        return self.rewrite.state

    @property
    def tables(self) -> IndexTables:
        return self.rewrite.tables(self.site)

    @property
    def settings(self) -> PruneSettings:
        return self.rewrite.settings

    @property
    def analysis(self) -> GraphAnalysis:
        return self.rewrite.analysis

    @property
    def env(self) -> dict:
        return self.rewrite.env

    @property
    def keep(self) -> int:
        return self.tables.sites[self.site].keep

    def call(self, fn, *args, **kwargs) -> fx.Node:
        return self.builder.call(fn, *args, **kwargs)

    def cached(self, key, build):
        return self.builder.cached(key, build)
