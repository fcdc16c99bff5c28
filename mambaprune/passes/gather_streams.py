"""Gather: every token tensor that reaches a node downstream of a site is cut to that site's tokens.

Invariant: after this rule, every token-carrying argument of a node in region r (downstream of site
r) holds exactly the K_r tokens kept at site r, in the layout the dense graph had there. Dense
tensors crossing the site (the hidden stream, a separate residual stream, the gate) are gathered at
the kept tokens' dense slots; tensors pruned at an earlier site are gathered again; constant token
tables (a direction bias indexed per step, a position table) are gathered when they meet pruned
tokens, in the layout of the tensor they meet. A dense H x W grid (a channels-first stream, as in
VMamba) becomes the K x 1 column of its kept cells (`gather_grid`); a constant with grid dims that
meets a pruned grid is gathered the same way.
"""
from __future__ import annotations

import torch.fx as fx

from ..compiler.token_flow import Grid, Tok, info_of, shape_of
from ..errors import UnsupportedModelError
from ..runtime import token_index as ti
from .token_state import Pruned, PruneContext


def cut_to_site(ctx: PruneContext, old_arg: fx.Node, new_arg: fx.Node, site: int) -> fx.Node:
    """The argument as seen by a node in region `site` (gathered when needed, cached)."""
    info = info_of(old_arg)
    state = ctx.state.get(new_arg)
    if isinstance(state, Pruned):
        if state.site == site or state.tok is None:  # a tuple (chunk/split): its items are cut instead
            return new_arg
        return _gather(ctx, new_arg, state.tok, state.site, site)
    if isinstance(info, (Tok, Grid)) and state is None:
        return _gather(ctx, new_arg, info, 0, site)
    return new_arg


def cut_constant(ctx: PruneContext, old_arg: fx.Node, new_arg: fx.Node, out_tok: Tok, out_rank: int,
                 site: int) -> fx.Node:
    """A dense non-token operand of a pointwise op whose broadcast dim meets the token axis."""
    shape = shape_of(old_arg)
    if shape is None or ctx.state.get(new_arg) is not None or info_of(old_arg) is not None:
        return new_arg
    aligned = out_tok.dim - (out_rank - len(shape))
    if aligned < 0 or shape[aligned] != out_tok.layout.length:
        return new_arg
    key = ("constant", new_arg, site, out_tok)
    if key not in ctx._cache:
        full = ctx.call(ti.align_constant, new_arg, out_rank)
        # a positional table is read where the kept tokens claim to be (vpos), like every token mixer
        ctx._cache[key] = ctx.call(ti.gather_tokens, full, ctx.ranks(site, out_tok.layout), out_tok.dim)
        ctx.state[ctx._cache[key]] = Pruned(site, out_tok)
    return ctx._cache[key]


def cut_grid_constant(ctx: PruneContext, old_arg: fx.Node, new_arg: fx.Node, out: Grid, out_rank: int,
                      site: int) -> fx.Node:
    """A dense non-token operand of a pointwise op on a pruned grid that varies over the grid's cells."""
    shape = shape_of(old_arg)
    if shape is None or ctx.state.get(new_arg) is not None or info_of(old_arg) is not None:
        return new_arg
    shift = out_rank - len(shape)
    if all(d - shift < 0 or shape[d - shift] == 1 for d in (out.hdim, out.wdim)):
        return new_arg
    key = ("grid constant", new_arg, site, out)
    if key not in ctx._cache:
        full = ctx.call(ti.expand_grid, ctx.call(ti.align_constant, new_arg, out_rank), out.hdim, out.wdim,
                        out.height, out.width)
        ctx._cache[key] = ctx.call(ti.gather_grid, full, ctx.ranks(site, out.layout), out.hdim, out.wdim)
        ctx.state[ctx._cache[key]] = Pruned(site, out)
    return ctx._cache[key]


def _gather(ctx: PruneContext, value: fx.Node, tok, older: int, site: int) -> fx.Node:
    key = ("gathered", value, site)
    if key not in ctx._cache:
        index = ctx.transfer_index(older, site, tok.layout)
        if isinstance(tok, Grid) and older == 0:
            node = ctx.call(ti.gather_grid, value, index, tok.hdim, tok.wdim)
        elif isinstance(tok, (Tok, Grid)):   # a pruned grid holds its kept cells along hdim
            node = ctx.call(ti.gather_tokens, value, index, tok.hdim if isinstance(tok, Grid) else tok.dim)
        else:
            raise UnsupportedModelError(f"{value.name} ({type(tok).__name__}) would have to cross a second site")
        ctx.state[node] = Pruned(site, tok)
        ctx._cache[key] = node
    return ctx._cache[key]


def summed_stream(ctx: PruneContext, parts: list, env: dict, site: int) -> fx.Node:
    """The sum of the stream's parts (old-graph nodes, e.g. ViM's hidden and residual), each cut to
    the tokens kept at `site` (0: dense)."""
    values = [env[p] if site == 0 else cut_to_site(ctx, p, env[p], site) for p in parts]
    total = values[0]
    for value in values[1:]:
        total = ctx.call(add, total, value)
        if site:
            ctx.state[total] = ctx.state[values[0]]
    return total


def add(a, b):
    """a + b as one call node (for sums the passes emit)."""
    return a + b
