"""Seeds: the first tensors (in topological order) that carry tokens.

A node whose inputs carry no tokens becomes a token tensor when it depends on the model's input,
has the batch first (the dynamic dim, or the fixed batch of a graph captured with it), and has exactly one dimension whose size is the token count of a
selective scan (or, for a 4-D map, exactly one pair of adjacent dims whose product is: a
(B, C, H, W) or (B, H, W, C) grid). When a width equals the token count, the token axis is the
one a flatten of a grid produced. A 4-D map's grid dims are read from where the map came from
when that is known (`spatial_dims`: a conv2d makes (B, C, H, W), permutes move H and W), never from
a channel count times a side that happens to equal a token count. A concatenation that creates the token axis marks the slots that
come from parameters as class tokens.
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx

from ..facts import Fact, Grid, Tok, Unknown
from ..layout import Layout
from ..ops import IDENTITY_OPS, aten, is_pointwise, is_static, op_name, shape_of
from ..shapes import view_groups
from .context import RuleContext
from .views import VIEW_OPS, dim_permutation


def seed(node: fx.Node, ctx: RuleContext) -> Fact:
    shape = shape_of(node)
    if shape is None or len(shape) < 2 or not ctx.is_batch(shape, 0) or not ctx.is_input_dependent(node):
        return None
    dims = flattened_grid_dims(node, shape, ctx)
    if dims and flattens_transposed_grid(node, shape, ctx):
        return Unknown("a flatten of a transposed (B, C, H, W)-like map whose token order could not be traced")
    if not dims and len(shape) == 4:
        spatial = spatial_dims(node, ctx)
        if spatial is None:
            return grid_seed(shape, ctx)
        h, w = spatial
        if not (is_static(shape[h]) and is_static(shape[w]) and shape[h] * shape[w] in ctx.token_lengths):
            return None
        return Grid(h, w, Layout.identity(shape[h] * shape[w]), shape[h], shape[w])
    if not dims and len(shape) == 3:  # (B, L, D) or (B, D, L)
        dims = [d for d in (1, 2) if is_static(shape[d]) and shape[d] in ctx.token_lengths]
        axis = grid_axis(node, ctx)
        if axis is not None:   # the other dim is the map's channels, whatever its width
            dims = [d for d in dims if d == axis]
    if len(dims) != 1:
        return None
    if node.target == aten.cat.default:
        note_class_tokens(node, dims[0], ctx)
    return Tok(dims[0], Layout.identity(shape[dims[0]]))


_MAKE_MAPS = ("aten::conv2d", "aten::max_pool2d", "aten::avg_pool2d", "aten::convolution")
_KEEP_DIMS = ("aten::layer_norm", "aten::native_layer_norm", "aten::batch_norm", "aten::group_norm",
              "aten::_native_batch_norm_legit_no_training", "aten::instance_norm")


def spatial_dims(node: fx.Node, ctx: RuleContext, depth: int = 0) -> Optional[tuple]:
    """The (H, W) dims of a 4-D map without tokens yet, from its history (None: not known).

    Walked back through permutes and ops that keep the dims (norms, pointwise, identities) to the
    conv2d / pooling that made the map; a pure function of the graph (nothing is recorded).
    """
    name = op_name(node)
    if name in _MAKE_MAPS:
        return (2, 3)
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if source is None or depth > 16 or ctx.shape(source) is None or len(ctx.shape(source)) != 4:
        return None
    if name in ("aten::permute", "aten::transpose"):
        known = spatial_dims(source, ctx, depth + 1)
        if known is None:
            return None
        where = {old: new for new, old in enumerate(dim_permutation(node, 4))}
        return (where[known[0]], where[known[1]])
    if name in IDENTITY_OPS or name in _KEEP_DIMS or is_pointwise(node):
        return spatial_dims(source, ctx, depth + 1)
    return None


def grid_axis(node: fx.Node, ctx: RuleContext, depth: int = 0) -> Optional[int]:
    """The dim of a 3-D tensor without tokens yet that holds a map's flattened grid (None: not known).

    Walked back through permutes, ops that keep the dims (slices too), and a concatenation (class
    tokens beside the patches) to the flatten of a map whose (H, W) `spatial_dims` knows: a width equal to the
    token count is then the channels, not the tokens (ViM with embed_dim = patches + 1).
    """
    name, shape = op_name(node), ctx.shape(node)
    if depth > 16 or shape is None or len(shape) != 3:
        return None
    if name == "aten::cat":
        axes = {grid_axis(part, ctx, depth + 1) for part in node.args[0]
                if isinstance(part, fx.Node) and ctx.is_input_dependent(part)}
        return axes.pop() if len(axes) == 1 else None
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if source is None:
        return None
    if name in VIEW_OPS and ctx.shape(source) is not None and len(ctx.shape(source)) == 4:
        spatial = spatial_dims(source, ctx)
        groups = view_groups(ctx.shape(source), shape) or []
        return next((go[0] for gi, go in groups if spatial and gi == list(spatial) and len(go) == 1), None)
    if name in ("aten::permute", "aten::transpose"):
        axis = grid_axis(source, ctx, depth + 1)
        return None if axis is None else dim_permutation(node, 3).index(axis)
    if name in IDENTITY_OPS or name in _KEEP_DIMS or name in ("aten::slice", "aten::narrow") or is_pointwise(node):
        return grid_axis(source, ctx, depth + 1)
    return None


def grid_seed(shape, ctx: RuleContext) -> Optional[Grid]:
    """A (B, C, H, W) or (B, H, W, C) map: exactly one pair of adjacent dims multiplies to a token count."""
    pairs = [(d, d + 1) for d in (1, 2) if is_static(shape[d]) and is_static(shape[d + 1])
             and shape[d] * shape[d + 1] in ctx.token_lengths]
    if len(pairs) != 1:
        return None
    h, w = pairs[0]
    return Grid(h, w, Layout.identity(shape[h] * shape[w]), shape[h], shape[w])


def _flattened_groups(node: fx.Node, shape, ctx: RuleContext) -> list:
    if op_name(node) not in VIEW_OPS or not isinstance(node.args[0], fx.Node):
        return []
    groups = view_groups(ctx.shape(node.args[0]), shape) or []
    return [(gi, go) for gi, go in groups if len(gi) == 2 and len(go) == 1 and shape[go[0]] in ctx.token_lengths]


def flattened_grid_dims(node: fx.Node, shape, ctx: RuleContext) -> list:
    """When a width equals the token count, the token axis is the one a flatten of the grid made."""
    return [go[0] for _, go in _flattened_groups(node, shape, ctx)]


def flattens_transposed_grid(node: fx.Node, shape, ctx: RuleContext) -> bool:
    """An untracked map whose two flattened dims were swapped by a permute/transpose before the flatten.

    Seeding it as row-major would be wrong (it is the column-major order of the map it came from).
    """
    flattened = _flattened_groups(node, shape, ctx)[0][0]
    source = node.args[0]
    while isinstance(source, fx.Node) and op_name(source) in IDENTITY_OPS:
        source = source.args[0]
    if not isinstance(source, fx.Node) or op_name(source) not in ("aten::permute", "aten::transpose"):
        return False
    perm = dim_permutation(source, len(ctx.shape(source)))
    return perm[flattened[0]] > perm[flattened[1]]


def note_class_tokens(cat: fx.Node, dim: int, ctx: RuleContext) -> None:
    """Slots of a concatenation that come from parameters, not from the image, are class tokens."""
    offset = 0
    for part in cat.args[0]:
        size = ctx.shape(part)[dim]
        if not ctx.is_input_dependent(part):
            ctx.mark_class_tokens(range(offset, offset + size))
        offset += size
