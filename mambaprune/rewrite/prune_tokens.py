"""Prune: rebuild the graph so that, after every planned site, only the kept tokens flow on.

Invariant: the returned GraphModule is new (the input is never modified, not even its buffers or
meta) and has the original call signature and output shapes. Nodes are re-emitted in an order
where everything upstream of site s (the ancestors of block s's output `y`) comes first; at each
site the score and selection nodes are emitted (score.py, select.py), then every downstream node
is re-emitted with its token arguments cut to the site (gather.py; under reduction="merge-*" the
stream's parts are merged instead: merge.py) by the first rewrite rule that
matches it (rules/: readout remap, conv1d, permutation, conv2d, scan gaps, copy); before the
downsampling that ends a pruned stage the grid is restored (stage_end.py) and the next stage runs
densely up to its own sites. With every keep rate at 1 and `hold`, the result computes exactly
what the dense graph computes (verify.py checks this on every model).

    dense:   x -> [block 0..k-1] -> y_k ---------------------------> [block k..] -> head
    pruned:  x -> [block 0..k-1] -> y_k -> score -> topk -> gather -> [block k.. on K tokens] -> head
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..analysis import GraphAnalysis, Grid, Tok, fact_of
from ..analysis.ops import is_pointwise, op_name
from ..pass_infra import GraphPass, InvariantError, PassResult
from ..settings import Alignment, PruneSettings
from .context import RewriteContext, SiteContext
from .merge import emit_merge
from .gather import cut_constant, cut_grid_constant, cut_to_site
from .restore import emit_restored, restore_outputs
from .rules import REWRITE_RULES
from .score import block_output, current_dim, emit_scores
from .select import emit_selection
from .stage_end import emit_stage_end

_COPIED_META = ("nn_module_stack", "stack_trace")


@dataclass(frozen=True)
class SiteSpec:
    key: int          # the site follows the first `key` blocks
    keep: int         # static number of tokens kept there


class PruneTokens(GraphPass):
    """The token-pruning rewrite of a captured graph for `sites`, with `settings`' alignment,
    metric and stage fill."""

    restorations: list = ()      # restore.Restoration: where the last rewrite restored pruned tokens, and how

    def __init__(self, analysis: GraphAnalysis, sites: list, settings: PruneSettings):
        self.analysis = analysis
        self.sites = sorted(sites, key=lambda s: s.key)
        self.settings = settings

    def requires(self, gm: fx.GraphModule) -> None:
        if self.analysis.gm is not gm:
            raise InvariantError("PruneTokens runs on the graph its analysis was made of")
        if self.settings.alignment is Alignment.AUTO:
            raise InvariantError("PruneTokens needs a concrete alignment (alignment='auto' is resolved by the search)")
        unknown = [s.key for s in self.sites if s.key not in self.analysis.sites]
        if unknown:
            raise InvariantError(f"sites {unknown} are not possible sites of this graph")

    def call(self, gm: fx.GraphModule) -> PassResult:
        if not self.sites:
            return PassResult(gm, False)
        return PassResult(self.rewrite(gm), True)

    def ensures(self, gm: fx.GraphModule) -> None:
        outputs = [n for n in gm.graph.nodes if n.op == "output"]
        if len(outputs) != 1:
            raise InvariantError("the rewritten graph must have exactly one output node")

    def rewrite(self, gm: fx.GraphModule) -> fx.GraphModule:
        analysis, sites = self.analysis, self.sites
        keys = [s.key for s in sites]
        ctx = RewriteContext(gm, analysis, keys, self.settings)
        region = {node: analysis.region(node, keys) for node in gm.graph.nodes}
        emitted = 0
        for old in sorted(gm.graph.nodes, key=lambda n: region[n] if n.op != "output" else len(sites) + 1):
            r = region[old]
            while emitted < r and old.op != "output":
                emit_site(ctx.at(sites[emitted].key), sites[emitted])
                emitted += 1
            ctx.env[old] = emit_node(ctx, old, sites[r - 1].key if r else 0)
        self.restorations = list(ctx.restorations)
        return ctx.builder.module()


def emit_node(ctx: RewriteContext, old: fx.Node, key: int) -> fx.Node:
    """The new node for `old`, which lies downstream of site `key` (0: the dense part)."""
    graph, env = ctx.builder.graph, ctx.env
    if old.op == "output":
        return graph.output(restore_outputs(ctx, old, ctx.restorations))
    if op_name(old) == "aten::_assert_tensor_metadata":
        return graph.node_copy(old, env.__getitem__)  # a dtype/device check of its input, as that input now is
    if key == 0 or old.op != "call_function" or old in ctx.analysis.after_stage(key):
        return graph.node_copy(old, env.__getitem__)  # dense (a later stage runs densely up to its own sites)
    stage_end = ctx.analysis.stage_end(key)
    if stage_end is not None and stage_end.runs_on_restored(old):
        return emit_stage_end(ctx.at(key), old)
    if ctx.analysis.runs_dense(old, key):
        return emit_restored(ctx.at(key), old)    # after the last token mixer, on restored tokens
    return emit_pruned(ctx.at(key), old)


def emit_site(ctx: SiteContext, site: SiteSpec) -> None:
    """Score the tokens after block `site.key`, select the K to keep and, under reduction="merge-*", where
    the others are merged (merge.py)."""
    block = ctx.analysis.blocks[site.key - 1]
    stream = ctx.analysis.stream_parts(site.key)
    scores = emit_scores(ctx, block, stream)
    y = block_output(ctx, block)
    nodes = emit_selection(ctx, scores, y, current_dim(ctx, y, fact_of(block.y)), site.keep, ctx.analysis.protected)
    emit_merge(ctx, nodes, stream)


def emit_pruned(ctx: SiteContext, old: fx.Node) -> fx.Node:
    """`old` re-emitted in a pruned region by the first rewrite rule that matches."""
    out = fact_of(old)
    meets_tokens = isinstance(out, (Tok, Grid)) and is_pointwise(old)
    rank = len(old.meta["val"].shape) if meets_tokens else 0
    cut = cut_constant if isinstance(out, Tok) else cut_grid_constant

    def operand(n: fx.Node) -> fx.Node:
        value = cut_to_site(ctx, n, ctx.env[n], ctx.site)
        if meets_tokens and fact_of(n) is None:
            value = cut(ctx, n, value, out, rank)
        return value

    args = fx.node.map_arg(old.args, operand)
    kwargs = fx.node.map_arg(old.kwargs, operand)
    rule = next(rule for rule in REWRITE_RULES if rule.matches(ctx, old, args))
    node = rule.emit(ctx, old, args, kwargs)
    node.meta.update({k: v for k, v in old.meta.items() if k in _COPIED_META})
    return node


def prune_tokens(gm: fx.GraphModule, analysis: GraphAnalysis, sites: list, settings: PruneSettings) -> PassResult:
    return PruneTokens(analysis, sites, settings)(gm)
