"""Readout: constant-index reads of the token axis follow their token; token outputs are restored.

Invariant: `x[:, i]` on a pruned tensor reads, per sample, the slot that now holds the token the
dense graph read at i (a protected token, so always kept). Pooling over the tokens needs no rewrite:
it pools the kept tokens. A graph output that still carries tokens is scattered back to L slots
(zeros at pruned positions) so that the model keeps its output shapes; a grid output is scattered
back to its H x W cells.
"""
from __future__ import annotations

import torch.fx as fx

from ..compiler.token_flow import Grid, MultiTok, Readout, info_of, op_name
from ..errors import UnsupportedModelError
from ..runtime import scatter_tokens
from ..runtime import token_index as ti
from .token_state import Pruned, PruneContext


def remap_select(ctx: PruneContext, old: fx.Node, args: tuple, site: int):
    info = info_of(old)
    if op_name(old) != "aten::select" or not isinstance(info, Readout):
        return None
    state = ctx.state.get(args[0])
    if not isinstance(state, Pruned):
        return None
    positions = ctx.positions(site, state.tok.layout)
    slot = ctx.call(ti.slot_of_position, positions, info.position)
    return ctx.call(ti.read_slot, args[0], slot, state.tok.dim)


def restore_output(contexts, value):
    """`value` (a graph output) with its token axis back at full length; `contexts` is prune_tokens'
    StageContexts (the shared pruned-state map and the PruneContext of each site)."""
    if isinstance(value, (list, tuple)):
        return type(value)(restore_output(contexts, v) for v in value)
    state = contexts.state.get(value) if isinstance(value, fx.Node) else None
    if not isinstance(state, Pruned):
        return value
    ctx = contexts.of(state.site)
    tok = state.tok
    if isinstance(tok, MultiTok) or tok is None:
        raise UnsupportedModelError(f"the model output {value.name} holds directions in different token orders")
    index = ctx.dense_index(state.site, tok.layout)
    if isinstance(tok, Grid):
        return ctx.call(ti.scatter_grid, value, index, tok.height, tok.width, tok.hdim, tok.wdim)
    return ctx.call(scatter_tokens, value, index, tok.layout.length, tok.dim)
