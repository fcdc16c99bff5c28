"""Prune: rebuild the graph so that, after every planned site, only the kept tokens flow on.

Invariant: the returned GraphModule has the original call signature and output shapes. Nodes are
re-emitted in an order where everything upstream of site s (the ancestors of block s's output `y`)
comes first; at each site the score and selection nodes are emitted, then every downstream node is
re-emitted with its token arguments cut to the site (gather_streams), token mixers aligned
(align_token_mixers), constant-index readouts remapped (remap_readout) and literal token counts in
shape arguments resized (resize_token_shapes); before the downsampling that ends a pruned stage the
grid is restored (restore_stage_grid) and the next stage runs densely up to its own sites. With every
keep rate at 1 and `hold`, the result computes exactly what the dense graph computes (compile_pruned
checks this on every model).

    dense:   x -> [block 0..k-1] -> y_k ---------------------------> [block k..] -> head
    pruned:  x -> [block 0..k-1] -> y_k -> score -> topk -> gather -> [block k.. on K tokens] -> head
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..compiler.token_flow import BatchTok, Grid, MultiTok, Tok, info_of
from .align_token_mixers import align_node, leave_grid
from .gather_streams import cut_constant, cut_grid_constant, cut_to_site
from .remap_readout import remap_select, restore_output
from .restore_stage_grid import emit_stage_end
from .resize_token_shapes import resize_shape_args
from .score_tokens import emit_scores
from .select_tokens import emit_selection
from .token_state import Pruned, PruneContext


@dataclass(frozen=True)
class SiteSpec:
    key: int          # the site follows the first `key` blocks
    keep: int         # static number of tokens kept there


def prune_tokens(gm: fx.GraphModule, analysis, sites: list, alignment: str, metric,
                 stage_fill: str = "carry") -> PassResult:
    if not sites:
        return PassResult(gm, False)
    sites = sorted(sites, key=lambda s: s.key)
    region = regions(gm, analysis, sites)
    ordered = sorted(gm.graph.nodes, key=lambda n: (region[n] if n.op != "output" else len(sites) + 1,))
    graph = fx.Graph()
    contexts = StageContexts(graph, gm, alignment, analysis, sites)
    env: dict = {}
    emitted = 0
    for old in ordered:
        r = region[old]
        while emitted < r and old.op != "output":
            emit_site(contexts.of(sites[emitted].key), analysis, sites[emitted], env, metric)
            emitted += 1
        if old.op == "output":
            env[old] = graph.output(restore_output(contexts, fx.node.map_arg(old.args[0], env.__getitem__)))
            continue
        if r == 0 or old.op != "call_function":
            env[old] = graph.node_copy(old, env.__getitem__)
            continue
        key = sites[r - 1].key
        if old in analysis.after_stage.get(key, ()):
            env[old] = graph.node_copy(old, env.__getitem__)  # a later stage, before its own sites: dense
            continue
        stage_end = analysis.stage_ends.get(key)
        if stage_end is not None and (old is stage_end.downsampling or old in stage_end.chain):
            env[old] = emit_stage_end(contexts.of(key), analysis, old, env, key, stage_fill)
            continue
        env[old] = emit_pruned(contexts.of(key), old, env, key)
    graph._codegen = gm.graph._codegen
    result = fx.GraphModule(gm, graph)
    result.graph.eliminate_dead_code()
    result.graph.lint()
    result.recompile()
    return PassResult(result, True)


class StageContexts:
    """One PruneContext per stage of a hierarchical model (its own token count and chain of sites),
    sharing the graph and the pruned-state map; an isotropic model has one."""

    def __init__(self, graph: fx.Graph, gm: fx.GraphModule, alignment: str, analysis, sites: list):
        self._by_site, self.state, current = {}, {}, None
        for site in sites:
            length = analysis.site_length(site.key)
            if current is None or current.length != length:
                current = PruneContext(graph, gm, alignment, length)
                current.state = self.state
            self._by_site[site.key] = current

    def of(self, key: int) -> PruneContext:
        return self._by_site[key]


def regions(gm: fx.GraphModule, analysis, sites: list) -> dict:
    """How many sites lie upstream of each node (0: dense part)."""
    region = {}
    for node in gm.graph.nodes:
        region[node] = sum(1 for s in sites if node not in analysis.cuts[s.key])
        if node.op in ("placeholder", "get_attr"):
            region[node] = 0
    return region


def emit_site(ctx: PruneContext, analysis, site: SiteSpec, env: dict, metric) -> None:
    block = analysis.blocks[site.key - 1]
    scores = emit_scores(ctx, block, env, metric, analysis.stream_parts(site.key))
    y = env[block.y]
    state = ctx.state.get(y)
    token_dim = state.tok.dim if isinstance(state, Pruned) else info_of(block.y).dim
    emit_selection(ctx, site.key, scores, y, token_dim, site.keep, analysis.protected)


def emit_pruned(ctx: PruneContext, old: fx.Node, env: dict, site: int) -> fx.Node:
    out = info_of(old)
    meets_tokens = isinstance(out, (Tok, Grid)) and _is_pointwise(old)
    rank = len(old.meta["val"].shape) if meets_tokens else 0
    cut = cut_constant if isinstance(out, Tok) else cut_grid_constant

    def operand(n: fx.Node) -> fx.Node:
        value = cut_to_site(ctx, n, env[n], site)
        if meets_tokens and info_of(n) is None:
            value = cut(ctx, n, value, out, rank, site)
        return value

    args = fx.node.map_arg(old.args, operand)
    kwargs = fx.node.map_arg(old.kwargs, operand)
    node = remap_select(ctx, old, args, site)
    if node is None:
        node = align_node(ctx, old, args, kwargs, site)
    if node is None:
        args = resize_shape_args(ctx, old, args, site)
        node = ctx.graph.create_node(old.op, old.target, args, kwargs, name=old.name)
        mark_state(ctx, old, node, site)
        node = leave_grid(ctx, old, node, site)
    node.meta.update({k: v for k, v in old.meta.items() if k in ("nn_module_stack", "stack_trace")})
    return node


def mark_state(ctx: PruneContext, old: fx.Node, node: fx.Node, site: int) -> None:
    states = [ctx.state.get(a) for a in node.all_input_nodes]
    out = info_of(old)
    pruned = [s for s in states if isinstance(s, Pruned)]
    if pruned and isinstance(out, (Tok, BatchTok, Grid, MultiTok, tuple)):
        ctx.state[node] = Pruned(max(s.site for s in pruned), None if isinstance(out, tuple) else out)


def _is_pointwise(node: fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags
