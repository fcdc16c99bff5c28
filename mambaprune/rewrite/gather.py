"""Gather: every token tensor that reaches a node downstream of a site is cut to that site's tokens.

Invariant: after this step, every token-carrying argument of a node in region r (downstream of
site r) holds exactly the K_r tokens kept at site r, in the layout the dense graph had there.
Dense tensors crossing the site (the hidden stream, a separate residual stream, the gate) are
gathered at the kept tokens' dense slots; tensors pruned at an earlier site are gathered again;
constant token tables (a direction bias indexed per step, a position table) are gathered when they
meet pruned tokens, in the layout of the tensor they meet. A dense H x W grid (a channels-first
stream, as in VMamba) becomes the K x 1 column of its kept cells (`gather_grid`); a constant with
grid dims that meets a pruned grid is gathered the same way.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..analysis import Grid, Tok, fact_of
from ..analysis.ops import shape_of
from ..errors import UnsupportedModelError
from ..runtime import token_index as ti
from ..runtime import token_merge as tm
from .context import SiteContext


def cut_to_site(ctx: SiteContext, old_arg: fx.Node, new_arg: fx.Node, site: int) -> fx.Node:
    """The argument as seen by a node in region `site` (gathered when needed, cached)."""
    fact = fact_of(old_arg)
    state = ctx.state.of(new_arg)
    if state is not None:
        if state.site == site or state.fact is None:  # a tuple (chunk/split): its items are cut instead
            return new_arg
        return _gather(ctx, new_arg, state.fact, state.site, site, old_arg)
    if isinstance(fact, (Tok, Grid)):
        return _gather(ctx, new_arg, fact, 0, site, old_arg)
    return new_arg


def cut_constant(ctx: SiteContext, old_arg: fx.Node, new_arg: fx.Node, out: Tok, out_rank: int) -> fx.Node:
    """A dense non-token operand of a pointwise op whose broadcast dim meets the token axis."""
    shape = shape_of(old_arg)
    if shape is None or ctx.state.of(new_arg) is not None or fact_of(old_arg) is not None:
        return new_arg
    aligned = out.dim - (out_rank - len(shape))
    if aligned < 0 or shape[aligned] != out.layout.length:
        return new_arg

    def build():
        full = ctx.call(ti.align_constant, new_arg, out_rank)
        # a positional table is read where the kept tokens claim to be (vpos), like every token mixer
        node = ctx.call(ti.gather_tokens, full, ctx.tables.ranks(ctx.site, out.layout), out.dim)
        return ctx.state.mark(node, ctx.site, out)
    return ctx.cached(("constant", new_arg, ctx.site, out), build)


def cut_grid_constant(ctx: SiteContext, old_arg: fx.Node, new_arg: fx.Node, out: Grid, out_rank: int) -> fx.Node:
    """A dense non-token operand of a pointwise op on a pruned grid that varies over the grid's cells."""
    shape = shape_of(old_arg)
    if shape is None or ctx.state.of(new_arg) is not None or fact_of(old_arg) is not None:
        return new_arg
    shift = out_rank - len(shape)
    if all(d - shift < 0 or shape[d - shift] == 1 for d in (out.hdim, out.wdim)):
        return new_arg

    def build():
        full = ctx.call(ti.expand_grid, ctx.call(ti.align_constant, new_arg, out_rank), out.hdim, out.wdim,
                        out.height, out.width)
        node = ctx.call(ti.gather_grid, full, ctx.tables.ranks(ctx.site, out.layout), out.hdim, out.wdim)
        return ctx.state.mark(node, ctx.site, out)
    return ctx.cached(("grid constant", new_arg, ctx.site, out), build)


def _gather(ctx: SiteContext, value: fx.Node, fact, older: int, site: int, old: fx.Node = None) -> fx.Node:
    def build():
        if merges_at(ctx, old, older, site):   # a part of the stream crossing a merging site
            return ctx.state.mark(merged(ctx, value, fact, older, site), site, fact)
        index = ctx.tables.transfer_index(older, site, fact.layout)
        if isinstance(fact, Grid) and older == 0:
            node = ctx.call(ti.gather_grid, value, index, fact.hdim, fact.wdim)
        elif isinstance(fact, (Tok, Grid)):   # a pruned grid holds its kept cells along hdim
            node = ctx.call(ti.gather_tokens, value, index, fact.hdim if isinstance(fact, Grid) else fact.dim)
        else:
            raise UnsupportedModelError(f"{value.name} ({type(fact).__name__}) would have to cross a second site")
        return ctx.state.mark(node, site, fact)
    return ctx.cached(("gathered", value, site), build)


def merges_at(ctx: SiteContext, old: fx.Node, older: int, site: int) -> bool:
    """Whether the old-graph node `old`, pruned at `older`, is merged (merge.py), not gathered, on its way
    to `site`: a part of the stream crossing a merging site."""
    merge = ctx.tables.merges.get(site)
    return merge is not None and old in merge.parts and older == ctx.tables.previous_site(site)


def merged(ctx: SiteContext, value: fx.Node, fact, older: int, site: int) -> fx.Node:
    """`value` (a part of the stream holding the tokens of `older`, the site before `site`) merged to the
    tokens kept at `site` (runtime/token_merge.py)."""
    merge, sel = ctx.tables.merges[site], ctx.tables.sites[site].sel
    args = (sel, merge.pruned, merge.target, merge.size, merge.merged_size)
    if isinstance(fact, Grid) and older == 0:
        return ctx.call(tm.merge_grid, value, *args, fact.hdim, fact.wdim)
    return ctx.call(tm.merge_tokens, value, *args, fact.hdim if isinstance(fact, Grid) else fact.dim)


def summed_stream(ctx: SiteContext, parts: list, site: int, fp32: bool = False) -> fx.Node:
    """The sum of the stream's parts (old-graph nodes, e.g. ViM's hidden and residual), each cut to
    the tokens kept at `site` (0: dense); `fp32`: half-precision parts summed in float32."""
    env = ctx.env
    values = [env[p] if site == 0 else cut_to_site(ctx, p, env[p], site) for p in parts]
    if fp32:
        values = [in_fp32(ctx, part, value) for part, value in zip(parts, values)]
    total = values[0]
    for value in values[1:]:
        total = ctx.call(add, total, value)
        if site:
            ctx.state.copy_to(total, values[0])
    return total


def in_fp32(ctx: SiteContext, old: fx.Node, new: fx.Node) -> fx.Node:
    """`new` cast to float32 when the old graph's value is float16 / bfloat16 (else `new` itself)."""
    val = old.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype not in (torch.float16, torch.bfloat16):
        return new
    cast = ctx.call(ti.to_fp32, new)
    return ctx.state.copy_to(cast, new) if ctx.state.of(new) is not None else cast


def add(a, b):
    """a + b as one call node (for sums the passes emit)."""
    return a + b
