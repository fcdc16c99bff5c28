"""Gather: every token tensor that reaches a node downstream of a site is cut to that site's tokens.

Invariant: after this rule, every token-carrying argument of a node in region r (downstream of site
r) holds exactly the K_r tokens kept at site r, in the layout the dense graph had there. Dense
tensors crossing the site (the hidden stream, a separate residual stream, the gate) are gathered at
the kept tokens' dense slots; tensors pruned at an earlier site are gathered again; constant token
tables (a direction bias indexed per step, a position table) are gathered when they meet pruned
tokens, in the layout of the tensor they meet.
"""
from __future__ import annotations

import torch.fx as fx

from ..compiler.token_flow import Tok, info_of, shape_of
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
    if isinstance(info, Tok) and state is None:
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


def _gather(ctx: PruneContext, value: fx.Node, tok: Tok, older: int, site: int) -> fx.Node:
    key = ("gathered", value, site)
    if key not in ctx._cache:
        index = ctx.transfer_index(older, site, tok.layout)
        node = ctx.call(ti.gather_tokens, value, index, tok.dim)
        ctx.state[node] = Pruned(site, tok)
        ctx._cache[key] = node
    return ctx._cache[key]
