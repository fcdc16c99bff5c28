"""Score: the importance of every token at a pruning site, in identity slot order.

Invariant: emits nodes only; the graph computes the same outputs as before. The score (B, L_site)
reads the block's SSM output `y` (after the gate, every direction merged back to token order) with
the chosen metric (DESIGN.md, runtime/token_index.py): clip, l1, l2, raw, random, novelty-y
(distance from the sample's mean token), or `delta` (mean of the softplus'd step size over channels,
over every scan of the block), or a user callable (y, token_dim) -> (B, L). `novelty` reads the
token stream crossing the site instead (the sum of its parts: ViM's hidden + residual, PlainMamba's
x; `y` when the crossing tensors are not one stream). Scores of a tensor in another layout are
moved back to identity slots; a scan that folds several directions into one call (MultiTok) is
scored per direction, each moved back from its own order.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from ..compiler.token_flow import Grid, MultiTok, info_of
from ..runtime import token_index as ti
from .gather_streams import add, summed_stream
from .token_state import Pruned, PruneContext


def emit_scores(ctx: PruneContext, block, env: dict, metric: str, stream: list = ()) -> fx.Node:
    if metric == "delta":
        return _delta_scores(ctx, block, env)
    if metric == "novelty" and stream:
        return _stream_scores(ctx, stream, env, metric)
    y = env[block.y]
    tok = info_of(block.y)
    dim = _current_dim(ctx, y, tok)
    scores = ctx.call(_named(metric), y, dim) if callable(metric) else ctx.call(ti.token_scores, y, dim, metric)
    return _to_identity(ctx, scores, y, tok.layout)


def _stream_scores(ctx: PruneContext, parts: list, env: dict, metric: str) -> fx.Node:
    """The metric on the token stream crossing the site (the sum of its parts)."""
    stream = summed_stream(ctx, parts, env, ctx.latest_site())
    tok = info_of(parts[0])
    if isinstance(tok, Grid):
        scores = ctx.call(ti.grid_token_scores, stream, tok.hdim, tok.wdim, metric)
    else:
        scores = ctx.call(ti.token_scores, stream, _current_dim(ctx, stream, tok), metric)
    return _to_identity(ctx, scores, stream, tok.layout)


def _delta_scores(ctx: PruneContext, block, env: dict) -> fx.Node:
    total = None
    for scan in block.scans:
        delta = env[scan.args[1]]
        bias = scan.kwargs.get("delta_bias", scan.args[7] if len(scan.args) > 7 else None)
        softplus = scan.kwargs.get("delta_softplus", scan.args[8] if len(scan.args) > 8 else False)
        if bias is not None:
            delta = ctx.call(_add_channel_bias, delta, env[bias])
        if softplus:
            delta = ctx.call(F.softplus, delta)
        info = info_of(scan.args[1])
        layouts = info.layouts if isinstance(info, MultiTok) else (info.layout,)
        for g, layout in enumerate(layouts):
            part = delta if len(layouts) == 1 else ctx.call(_channel_part, delta, g, len(layouts))
            scores = _to_identity(ctx, ctx.call(ti.token_scores, part, 2, "delta"), env[scan.args[1]], layout)
            total = scores if total is None else ctx.call(add, total, scores)
    return total


def _to_identity(ctx: PruneContext, scores: fx.Node, value: fx.Node, layout) -> fx.Node:
    if layout == ctx.identity:
        return scores
    state = ctx.state.get(value)
    if isinstance(state, Pruned):
        return ctx.call(ti.scores_to_identity, scores, ctx.order(state.site, layout))
    return ctx.call(_columns, scores, ctx.rank_table(layout))


def _named(metric):
    """fx names call targets after their __name__: give partials and callable objects one."""
    def user_metric(y, token_dim):
        return metric(y, token_dim)
    return user_metric


def _current_dim(ctx: PruneContext, value: fx.Node, tok) -> int:
    state = ctx.state.get(value)
    return state.tok.dim if isinstance(state, Pruned) else tok.dim


def _add_channel_bias(delta, bias):
    return delta + bias.reshape(1, -1, 1)


def _channel_part(delta, index, parts):
    """Channels of direction `index` of a (B, parts * D, L) tensor."""
    return delta.chunk(parts, dim=1)[index]



def _columns(scores, rank):
    return scores[:, rank.to(scores.device)]
