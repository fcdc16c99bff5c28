"""Score: the importance of every token at a pruning site, in identity slot order.

Invariant: emits nodes only; the graph computes the same outputs as before. The score (B, L_site)
reads the block's SSM output `y` (after the gate, every direction merged back to token order) with
the chosen metric (DESIGN.md, runtime/token_index.py): clip, l1, l2, raw, random, novelty-y
(distance from the sample's mean token), or `delta` / `delta-max` (mean of the softplus'd step size
over channels, summed over every scan of the block / their maximum: token_index.step_scores; a
model whose scans have no per-token delta is refused), or a user callable (y, token_dim) -> (B, L). `novelty` reads the
token stream crossing the site instead (the sum of its parts: ViM's hidden + residual, PlainMamba's
x; `y` when the crossing tensors are not one stream). Scores of a tensor in another layout are
moved back to identity slots; a scan that folds several directions into one call (MultiTok) is
scored per direction, each moved back from its own order.

Scores are computed in float32 (token_index.token_scores casts what it reduces; a half-precision
stream's parts and step sizes are cast before they are summed), so that in fp16 / bf16 the kept
tokens depend on the model's rounding as little as they can; equal scores keep the lower original
position (token_index.select_tokens).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..analysis import Block, Grid, MultiTok, Tok, fact_of
from ..analysis.ops import argument, scan_signature
from ..errors import UnsupportedModelError
from ..runtime import token_index as ti
from .context import SiteContext
from .gather import add, cut_to_site, in_fp32, summed_stream


def emit_scores(ctx: SiteContext, block: Block, stream: list) -> fx.Node:
    metric = ctx.settings.metric
    if metric in ti.STEP_METRICS:
        return _delta_scores(ctx, block, metric)
    if metric == "novelty" and stream:
        return _stream_scores(ctx, stream, metric)
    y = block_output(ctx, block)
    fact = fact_of(block.y)
    dim = current_dim(ctx, y, fact)
    scores = ctx.call(_named(metric), y, dim) if callable(metric) else ctx.call(ti.token_scores, y, dim, metric)
    return _to_identity(ctx, scores, y, fact.layout)


def block_output(ctx: SiteContext, block: Block) -> fx.Node:
    """The block's `y` in the rewritten graph, holding the tokens present at the site. A block whose
    moves ran on the restored dense tensor (rules/dense_moves.py) may leave `y` dense: it is then cut to
    the tokens kept at the previous site."""
    y = ctx.env[block.y]
    previous = ctx.tables.latest_site()
    if previous and ctx.state.of(y) is None and isinstance(fact_of(block.y), (Tok, Grid)):
        return cut_to_site(ctx, block.y, y, previous)
    return y


def _stream_scores(ctx: SiteContext, parts: list, metric: str) -> fx.Node:
    """The metric on the token stream crossing the site (the sum of its parts)."""
    stream = summed_stream(ctx, parts, ctx.tables.latest_site(), fp32=True)
    fact = fact_of(parts[0])
    if isinstance(fact, Grid):
        scores = ctx.call(ti.grid_token_scores, stream, fact.hdim, fact.wdim, metric)
    else:
        scores = ctx.call(ti.token_scores, stream, current_dim(ctx, stream, fact), metric)
    return _to_identity(ctx, scores, stream, fact.layout)


def _delta_scores(ctx: SiteContext, block: Block, metric: str) -> fx.Node:
    """Step-size scores (B, L): per scan and direction the mean over channels of the softplus'd delta
    (+ delta_bias), moved back to identity slots; summed over them ("delta") or their maximum ("delta-max").

    A step size is how much a token writes into the state and how much of the state it lets decay
    (h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t): a scan that gives a token a large step selects it.
    Step sizes as training-free token importance are the score of MTR (Ma et al., "Training-free Token
    Reduction for Vision Mamba", arXiv 2507.14042, 2025: Vim-B -1.6 top-1 at -40% FLOPs without
    retraining). Its summary describes a max-pooling of the step-size responses, which "delta-max"
    reads as the maximum over the block's scans (a token counts when any direction selects it); the
    paper's exact pooling is our reading (its full text was not available to us)."""
    total = None
    for scan in block.scans:
        signature = scan_signature(scan)
        delta_node = argument(scan, signature.step)
        if not isinstance(delta_node, fx.Node) or not isinstance(fact_of(delta_node), (Tok, MultiTok)):
            raise UnsupportedModelError(
                f"metric='{metric}' reads the step sizes (delta) of the scans, but the scan {scan.name} of block "
                f"{block.index} has no per-token delta the rewrite can read. Use metric='novelty' or 'clip'.")
        delta = in_fp32(ctx, delta_node, ctx.env[delta_node])
        bias = argument(scan, signature.step_bias)
        if bias is not None:
            delta = ctx.call(_add_bias, delta, in_fp32(ctx, bias, ctx.env[bias]), signature.bias_axis)
        if argument(scan, signature.step_softplus, False):
            delta = ctx.call(F.softplus, delta)
        fact = fact_of(delta_node)
        layouts = fact.layouts if isinstance(fact, MultiTok) else (fact.layout,)
        for g, layout in enumerate(layouts):
            part = delta if len(layouts) == 1 else ctx.call(_channel_part, delta, g, len(layouts))
            scores = ctx.call(ti.token_scores, part, fact.dim, "delta")
            scores = _to_identity(ctx, scores, ctx.env[delta_node], layout)
            combine = add if metric == "delta" else _maximum
            total = scores if total is None else ctx.call(combine, total, scores)
    return total


def _to_identity(ctx: SiteContext, scores: fx.Node, value: fx.Node, layout) -> fx.Node:
    if layout == ctx.tables.identity:
        return scores
    state = ctx.state.of(value)
    if state is not None:
        return ctx.call(ti.scores_to_identity, scores, ctx.tables.order(state.site, layout))
    return ctx.call(_columns, scores, ctx.tables.rank_table(layout))


def current_dim(ctx: SiteContext, value: fx.Node, fact) -> int:
    """The token dim of `value` in the rewritten graph (a pruned tensor's own fact wins)."""
    state = ctx.state.of(value)
    return state.fact.dim if state is not None else fact.dim


def _named(metric):
    """fx names call targets after their __name__: give partials and callable objects one."""
    def user_metric(y, token_dim):
        return metric(y, token_dim)
    return user_metric


def _add_bias(delta, bias, axis):
    """delta + bias along `axis` of delta (the channels of (B, D, L), the heads of (B, L, H))."""
    shape = [1] * delta.dim()
    shape[axis] = -1
    return delta + bias.reshape(shape)


def _maximum(a, b):
    return torch.maximum(a, b)


def _channel_part(delta, index, parts):
    """Channels of direction `index` of a (B, parts * D, L) tensor."""
    return delta.chunk(parts, dim=1)[index]


def _columns(scores, rank):
    return scores[:, rank.to(scores.device)]
