"""Rules for ops that only move dims: views and reshapes (followed through their dim groups),
broadcasts, and permutations of dims."""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from ..facts import BatchTok, Fact, Grid, MultiGrid, MultiTok, NotUnderstood, PaddedTok, Tok, multi
from ..ops import aten, argument, is_static, norm_dim, op_name
from ..shapes import view_groups
from .context import RuleContext
from .registry import token_rule

VIEW_OPS = frozenset({"aten::view", "aten::reshape", "aten::_unsafe_view", "aten::flatten", "aten::unflatten",
                      "aten::squeeze", "aten::unsqueeze", "aten::expand", "aten::view_as", "aten::reshape_as",
                      "aten::expand_as"})


@token_rule(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze,
            aten.unsqueeze, aten.view_as, aten.reshape_as, aten.expand_as)
def view(node: fx.Node, ctx: RuleContext) -> Fact:
    """The token axis is followed through the groups of dims the view pairs up."""
    x = ctx.fact(node.args[0])
    in_shape, out_shape = ctx.shape(node.args[0]), ctx.shape(node)
    groups = view_groups(in_shape, out_shape)
    name = op_name(node)
    if groups is None:
        raise NotUnderstood(f"{name} {in_shape} -> {out_shape} could not be followed")
    if isinstance(x, Tok):
        return _view_tok(x, groups, in_shape, out_shape, name, ctx)
    if isinstance(x, MultiTok):
        return _view_parts(x, groups, in_shape, out_shape, name)
    if isinstance(x, BatchTok):
        return _view_batch_tok(x, groups, in_shape, out_shape, name, ctx)
    if isinstance(x, Grid):
        return _view_grid(x, groups, in_shape, out_shape, name)
    if isinstance(x, MultiGrid):
        return _view_multi_grid(x, groups, in_shape, out_shape, name)
    raise NotUnderstood(f"{name} of {type(x).__name__}")


@token_rule(aten.expand)
def expand(node: fx.Node, ctx: RuleContext) -> Fact:
    """A broadcast of size-1 dims (einops repeat) keeps the token axis where it is."""
    x = ctx.fact(node.args[0])
    in_shape, out_shape = ctx.shape(node.args[0]), ctx.shape(node)
    shift = len(out_shape) - len(in_shape)
    aligned = all(a == 1 or str(a) == str(b) for a, b in zip(in_shape, out_shape[shift:]))
    if aligned and not isinstance(x, (PaddedTok, Grid)) and in_shape[x.dim] == out_shape[x.dim + shift]:
        return x.shifted(shift)
    return view(node, ctx)


@token_rule(aten.permute, aten.transpose, aten.t, aten.movedim)
def permute(node: fx.Node, ctx: RuleContext) -> Fact:
    x = ctx.fact(node.args[0])
    if x is None:
        return None
    perm = dim_permutation(node, len(ctx.shape(node)))
    return x.permuted({old: new for new, old in enumerate(perm)})


def dim_permutation(node: fx.Node, ndim: int) -> list:
    """out dim i is input dim perm[i], for permute / transpose / t / movedim."""
    name = op_name(node)
    if name == "aten::permute":
        return [norm_dim(d, ndim) for d in argument(node, "dims")]
    if name == "aten::t":
        return [1, 0]
    if name == "aten::movedim":
        return [int(p) for p in np.moveaxis(np.arange(ndim), argument(node, "source"), argument(node, "destination"))]
    a, b = norm_dim(argument(node, "dim0"), ndim), norm_dim(argument(node, "dim1"), ndim)
    perm = list(range(ndim))
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _is_batch_then_token(group: list, token_dim: int, shape, ctx: RuleContext) -> bool:
    return len(group) == 2 and group[1] == token_dim and ctx.is_batch(shape, group[0])


def _view_tok(x: Tok, groups, in_shape, out_shape, name, ctx: RuleContext) -> Fact:
    for gi, go in groups:
        if x.dim not in gi:
            continue
        if gi == [x.dim] and len(go) == 1:
            return Tok(go[0], x.layout)
        if gi == [x.dim] and len(go) == 2 and go[1] == go[0] + 1:
            return Grid(go[0], go[1], x.layout, out_shape[go[0]], out_shape[go[1]])
        if _is_batch_then_token(gi, x.dim, in_shape, ctx) and len(go) == 1:
            return BatchTok(go[0], x.layout)
        raise NotUnderstood(f"{name} merges the token axis with other dims {in_shape} -> {out_shape}")
    raise NotUnderstood(f"{name} of {type(x).__name__}")


def _view_batch_tok(x: BatchTok, groups, in_shape, out_shape, name, ctx: RuleContext) -> Fact:
    for gi, go in groups:
        if x.dim not in gi:
            continue
        if gi == [x.dim] and len(go) == 1:
            return BatchTok(go[0], x.layout)
        if gi == [x.dim] and len(go) == 2 and ctx.is_batch(out_shape, go[0]) and out_shape[go[1]] == x.layout.length:
            return Tok(go[1], x.layout)
    raise NotUnderstood(f"{name} reshapes flattened batch x tokens {in_shape} -> {out_shape}")


def _view_grid(x: Grid, groups, in_shape, out_shape, name) -> Fact:
    for gi, go in groups:
        if x.hdim in gi or x.wdim in gi:
            if gi == [x.hdim, x.wdim] and len(go) == 1:
                return Tok(go[0], x.layout)
            if gi == [x.wdim, x.hdim] and len(go) == 1:
                return Tok(go[0], x.layout.grid_transposed(x.height, x.width))
            if len(gi) == 1 and len(go) == 1:
                continue
            if len(gi) == 1 and len(go) == 2 and all(out_shape[d] != 1 for d in go):
                raise NotUnderstood(f"{name} reshapes the token grid {in_shape} -> {out_shape} into windows (a window "
                                    "partition with several windows per image is not followed; windows that cover "
                                    "the whole grid are)")
            if len(gi) == 2 and len(go) == 1 and all(in_shape[d] != 1 for d in gi):
                raise NotUnderstood(f"{name} reshapes the token grid {in_shape} -> {out_shape} merging windows (a window "
                                    "reverse with several windows per image is not followed; windows that cover the "
                                    "whole grid are)")
            raise NotUnderstood(f"{name} reshapes the token grid {in_shape} -> {out_shape}")
    hd = next(go[0] for gi, go in groups if gi == [x.hdim])
    wd = next(go[0] for gi, go in groups if gi == [x.wdim])
    return Grid(hd, wd, x.layout, x.height, x.width)


def _view_parts(x: MultiTok, groups, in_shape, out_shape, name) -> Fact:
    """A view keeps the token axis alone and the direction axis as the major dim of its group."""
    new_dim = new_gdim = grid = None
    for gi, go in groups:
        if x.dim in gi:
            if gi == [x.dim] and len(go) == 2 and go[1] == go[0] + 1:   # tokens viewed as H x W
                grid = go
            elif gi != [x.dim] or len(go) != 1:
                raise NotUnderstood(f"{name} reshapes the token axis of directions folded into one tensor")
            new_dim = go[0]
        if x.gdim in gi:
            new_gdim = _parts_after_view(x, gi, go, in_shape, out_shape, name)
    if grid is not None:
        return MultiGrid(grid[0], grid[1], new_gdim, x.layouts, out_shape[grid[0]], out_shape[grid[1]])
    return multi(new_dim, new_gdim, x.layouts)


def _view_multi_grid(x: MultiGrid, groups, in_shape, out_shape, name) -> Fact:
    """Only back to one token axis (the grid's cells in row-major order), the direction axis alone."""
    new_dim = new_gdim = None
    for gi, go in groups:
        if gi == [x.hdim, x.wdim] and len(go) == 1:
            new_dim = go[0]
        elif gi == [x.gdim] and len(go) == 1:
            new_gdim = go[0]
        elif x.hdim in gi or x.wdim in gi or x.gdim in gi:
            raise NotUnderstood(f"{name} reshapes directions folded into one tensor viewed as a grid "
                                f"{tuple(in_shape)} -> {tuple(out_shape)}")
    if new_dim is None or new_gdim is None:
        raise NotUnderstood(f"{name} of directions folded into one tensor viewed as a grid {tuple(in_shape)} -> "
                            f"{tuple(out_shape)} (only a view back to one token axis is understood)")
    return multi(new_dim, new_gdim, x.layouts)


def _parts_after_view(x: MultiTok, gi: list, go: list, in_shape, out_shape, name) -> int:
    """The output dim that the parts run along; each part must stay a block of whole slices of it."""
    sizes_in, sizes_out = [in_shape[d] for d in gi], [out_shape[d] for d in go]
    if gi[0] != x.gdim or not all(is_static(s) for s in sizes_in + sizes_out):
        raise NotUnderstood(f"{name} interleaves directions folded into one tensor with another axis "
                            f"{tuple(in_shape)} -> {tuple(out_shape)}")
    block = int(np.prod(sizes_in)) // len(x.layouts)   # elements of one part in the flattened group
    for j in range(len(go)):
        if int(np.prod(sizes_out[:j])) != 1:
            break
        inner = int(np.prod(sizes_out[j + 1:]))
        if block % inner == 0 and sizes_out[j] == len(x.layouts) * (block // inner):
            return go[j]
    raise NotUnderstood(f"{name} splits directions folded into one tensor across axes "
                        f"{tuple(in_shape)} -> {tuple(out_shape)}")
