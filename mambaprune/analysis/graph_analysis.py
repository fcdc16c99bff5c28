"""The analysis of a captured graph: token facts on every node, SSM blocks, and possible sites.

`analyse(gm)` (or the `AnalyseGraph` pass) propagates token facts (tokens/), groups the scans into
blocks (blocks.py) and decides after which blocks pruning is possible (sites.py). The result is a
`GraphAnalysis` (`AnalyseGraph.result`); the planner, the rewrite and the report read it and
nothing else about the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from ..meta_keys import TOKENS
from ..pass_infra import GraphPass, InvariantError, PassResult
from .blocks import Block, describe_block, group_blocks, to_networkx
from .facts import fact_of, is_token_fact
from .ops import is_scan, op_name, scan_length, shape_of
from .sites import NotUnderstoodNode, Site, StageEnd, collect_not_understood, crossing, find_sites
from .stream_chain import ancestors_where, stream_and_chain
from .tokens import propagate_tokens

__all__ = ["AnalyseGraph", "GraphAnalysis", "Block", "Site", "StageEnd", "NotUnderstoodNode", "analyse"]


@dataclass
class GraphAnalysis:
    gm: fx.GraphModule
    blocks: list                    # Block, in graph order
    token_length: int
    protected: set                  # original positions never pruned (class tokens, constant-index reads)
    class_tokens: set
    not_understood: list            # NotUnderstoodNode: the first node of each thing not understood
    barriers: list = field(default_factory=list)       # downsamplings between stages (token grid changes)
    sites: dict = field(default_factory=dict)          # site key -> Site (possible sites, in block order)
    invalid_sites: dict = field(default_factory=dict)  # site key -> why not
    _carried_chains: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # keys -> chain

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def valid_sites(self) -> list:
        return list(self.sites)

    def site_length(self, key: int) -> int:
        """Tokens flowing at a site (the stage of the block it follows)."""
        return self.blocks[key - 1].token_length

    def stage_end(self, key: int) -> Optional[StageEnd]:
        return self.sites[key].stage_end

    def same_stage(self, a: int, b: int) -> bool:
        """Whether sites `a` and `b` prune the tokens of one stage: one token count and one stage end (two
        stages of equal size, as an encoder's and a decoder's in a U-Net, end at different barriers)."""
        return self.site_length(a) == self.site_length(b) and self.stage_end(a) == self.stage_end(b)

    def runs_dense(self, node: fx.Node, key: int) -> bool:
        """Whether `node`, fed by site `key`, runs on dense tokens: after the downsampling that ends the site's
        stage, or after the last token mixer on tokens restored to full length (sites.restored_tail)."""
        site = self.sites[key]
        return node in site.after_stage or node in site.restored

    def after_stage(self, key: int) -> set:
        """Nodes after the downsampling that ends site `key`'s stage (empty for an isotropic model)."""
        return self.sites[key].after_stage

    def protected_below(self, length: int) -> int:
        return sum(1 for p in self.protected if p < length)

    def region(self, node: fx.Node, keys: list) -> int:
        """How many of the sites `keys` feed `node` (0: the dense part: everything upstream of the first
        site, placeholders and constants, and values no site feeds, computed exactly as the model does)."""
        return sum(1 for key in keys if node in self.sites[key].fed)

    def crossing_tokens(self, key: int) -> list:
        """The token tensors computed before site `key` and read by what it feeds, in graph order: the
        token stream the next block receives (one tensor, or a hidden and a residual part as in ViM)."""
        site = self.sites[key]
        return crossing(site.cut, site.fed, self.site_length(key), self.gm.graph.nodes)

    def stream_parts_like(self, like: fx.Node, key: int) -> list:
        """The tensors crossing site `key` with the token fact and per-sample shape of `like`."""
        wanted = (fact_of(like), tuple(shape_of(like)[1:]))
        return [n for n in self.crossing_tokens(key) if (fact_of(n), tuple(shape_of(n)[1:])) == wanted]

    def is_stream_sum(self, node: fx.Node, keys) -> bool:
        """Whether `node` is the residual stream of a stage at sites `keys`: a sum (an add) with the token
        fact and per-sample shape of a tensor crossing each of them (fill="carry" carries it; the rewrite,
        the masked run and the planner all ask this)."""
        return op_name(node) == "aten::add" and all(self.stream_parts_like(node, key) for key in keys)

    def carried_chain(self, keys: tuple) -> frozenset:
        """With the sites `keys` of one stage (the last feeds its end) and fill="carry": the per-token ops
        from the stage's residual stream to the tensor restored before its downsampling, which the rewrite
        re-runs densely on the carried stream (rewrite/restore.carried): empty when that tensor is the
        stream itself, or the stage has no end."""
        if keys not in self._carried_chains:
            self._carried_chains[keys] = self._carried_chain(keys)
        return self._carried_chains[keys]

    def _carried_chain(self, keys: tuple) -> frozenset:
        last = keys[-1]
        end = self.stage_end(last)
        if end is None:
            return frozenset()
        fed = self.sites[last].fed
        pruned = ancestors_where(end.restore, lambda n: n in fed and not self.runs_dense(n, last)
                                 and is_token_fact(fact_of(n)))
        found = stream_and_chain(end.restore, pruned, lambda n: self.is_stream_sum(n, keys))
        return frozenset(found[1]) if found is not None else frozenset()

    def stream_parts(self, key: int) -> list:
        """crossing_tokens(key) when they are parts of one stream (same token axis, order and shape:
        their sum is what the next block reads); [] otherwise."""
        parts = self.crossing_tokens(key)
        kinds = {(fact_of(n), tuple(shape_of(n)[1:])) for n in parts}
        return parts if len(kinds) == 1 else []


def analyse(gm: fx.GraphModule, batch: Optional[int] = None) -> GraphAnalysis:
    """Find the SSM blocks of `gm` and the sites after which tokens may be pruned (`batch`: the fixed
    batch of a graph captured with it; None when the batch is dynamic)."""
    scans = [n for n in gm.graph.nodes if is_scan(n)]
    if not scans:
        return GraphAnalysis(gm, [], 0, set(), set(), [])
    lengths = {scan_length(s) for s in scans}
    flow = propagate_tokens(gm, lengths, batch)
    graph = to_networkx(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    blocks = [describe_block(i, members, graph, order) for i, members in enumerate(group_blocks(scans, graph, order))]
    sites, invalid = find_sites(gm, blocks, flow.barriers, graph, order)
    on_kept_tokens = set().union(*(site.fed - site.restored - site.after_stage for site in sites.values()))
    dense_everywhere = {n for n in gm.graph.nodes if n not in on_kept_tokens} if sites else set()
    return GraphAnalysis(gm, blocks, max(lengths), set(flow.protected), set(flow.class_tokens),
                         collect_not_understood(gm, dense_everywhere), list(flow.barriers), sites, invalid)


class AnalyseGraph(GraphPass):
    """Analyse: token facts on every node; blocks and sites in `self.result`.

    Invariant: the graph is not changed (modified is False); afterwards every node carries a token
    fact (possibly None) under meta_keys.TOKENS.
    """

    result: Optional[GraphAnalysis] = None

    def __init__(self, batch: Optional[int] = None):
        self.batch = batch

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.result = analyse(gm, self.batch)
        return PassResult(gm, False)

    def ensures(self, gm: fx.GraphModule) -> None:
        if self.result.blocks:
            missing = [n.name for n in gm.graph.nodes if TOKENS not in n.meta]
            if missing:
                raise InvariantError(f"nodes without a token fact after the analysis: {missing[:5]}")
