"""Data movement understood by evaluation: one rule for every op that only moves elements.

Instead of one pattern rule per op, the op is run on position tensors: every input element is
replaced by a code (int64, its index among all input elements), the op moves the codes as it
would move the data, and each output element's code says which input element it holds, hence the
original token position it carries (-1: none, e.g. a class token's constant), its sample (batch
coordinate) and, for directions folded into one tensor, its part. Compositions need no rule of
their own. The output's fact is read from those arrays:

- the positions vary along one dim, as a permutation of all L tokens: `Tok` (a scan order);
- along two dims, as a permutation of L: `Grid`; along two dims, each row a permutation: the
  parts of a `MultiTok` (rows grouped by the input part they come from); along three: `MultiGrid`;
- batch and tokens flattened together, batch-major: `BatchTok`;
- anything else that keeps every sample apart (windows, a subset beside constant slots):
  `TokenMap`, followed by the next data movement only; the rewrite restores the pruned tokens
  before such a chain and gathers them after it (rewrite/rules/dense_moves.py);
- a sample mixed with the tokens of another (a window partition that folds windows into the
  batch): refused, naming the op.

Sizes that are symbolic in the graph (the batch) are evaluated at their example values.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.fx as fx

from ...meta_keys import PERMUTATION
from ..facts import BatchTok, Fact, Grid, MultiGrid, MultiTok, NotUnderstood, Readout, Tok, TokenMap, multi, varies
from ..layout import Layout
from ..ops import aten, argument, is_static, op_name
from ..shapes import view_groups
from .context import RuleContext, constant_tensor
from .position_maps import along, is_permutation, upsampled
from .registry import token_rule

# ops that only move elements: every one is understood by evaluation (slice and select in indexing.py
# first look at what only they mean: a conv1d's padding, a strided downsampling, a readout)
MOVEMENT_PACKETS = (aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze,
                    aten.unsqueeze, aten.view_as, aten.reshape_as, aten.expand_as, aten.expand, aten.permute,
                    aten.transpose, aten.t, aten.movedim, aten.flip, aten.roll, aten.narrow, aten.index,
                    aten.index_select, aten.cat, aten.stack, aten.chunk, aten.split, aten.split_with_sizes,
                    aten.tensor_split, aten.unbind, aten.pixel_shuffle, aten.pixel_unshuffle, aten.unfold,
                    aten.repeat, aten.repeat_interleave, aten.slice, aten.select)
MOVEMENT_OPS = frozenset(f"aten::{packet.__name__}" for packet in MOVEMENT_PACKETS)
_INDEX_ARGUMENTS = ("indices", "index")
_FOLLOWED = (Tok, Grid, TokenMap)   # what a TokenMap may come from (the rewrite can restore them)


@token_rule(*[p for p in MOVEMENT_PACKETS if p not in (aten.slice, aten.select)])
def movement(node: fx.Node, ctx: RuleContext) -> Fact:
    return evaluate(node, ctx)


def is_movement(node: fx.Node) -> bool:
    return node.op == "call_function" and op_name(node) in MOVEMENT_OPS


def evaluate(node: fx.Node, ctx: RuleContext) -> Fact:
    """The fact of a data-movement node, read from the op run on position tensors.

    Repeated blocks repeat their moves: a move already evaluated on inputs of the same shapes and
    facts (and the same constant indices) gives the same fact without running again."""
    key = _memo_key(node, ctx)
    fact = ctx.evaluated.get(key) if key is not None else None
    if fact is None:
        fact = _evaluate(node, ctx)
        if key is not None and _reusable(fact):
            ctx.evaluated[key] = fact
    _annotate_permutation(node, ctx, fact)
    return fact


def _reusable(fact) -> bool:
    """Facts that do not name their node (a TokenMap names the op that made it)."""
    return all(not isinstance(f, TokenMap) for f in (fact if isinstance(fact, tuple) else (fact,)))


class _Unkeyable(Exception):
    pass


def _memo_key(node: fx.Node, ctx: RuleContext):
    index_nodes = _index_nodes(node)

    def key_of(value):
        if isinstance(value, fx.Node):
            val = value.meta.get("val")
            if not isinstance(val, torch.Tensor):
                return ("size", concrete(val))
            if value in index_nodes:
                tensor = constant_tensor(ctx.gm, value)
                if tensor is None or tensor.is_meta:
                    raise _Unkeyable
                return ("index", tuple(tensor.shape), tensor.detach().cpu().numpy().tobytes())
            fact = ctx.fact(value)
            if not _reusable(fact):
                raise _Unkeyable
            return ("tensor", tuple(str(s) for s in val.shape), fact)
        if isinstance(value, (list, tuple)):
            return tuple(key_of(v) for v in value)
        if isinstance(value, torch.SymInt):
            return ("sym", str(value))
        return value

    try:
        key = (node.target, key_of(node.args), tuple((k, key_of(v)) for k, v in node.kwargs.items()))
        hash(key)
        return key
    except (_Unkeyable, TypeError):
        return None


def _annotate_permutation(node: fx.Node, ctx: RuleContext, fact) -> None:
    """A constant gather that permutes the tokens: the permutation of the slots (rewrite: ReorderTokens)."""
    source = ctx.fact(node.args[0])
    if op_name(node) in ("aten::index", "aten::index_select") and isinstance(fact, Tok) \
            and isinstance(source, Tok) and fact.layout != source.layout:
        ctx.annotate(node, PERMUTATION, source.layout.rank[fact.layout.path])


def _index_nodes(node: fx.Node) -> set:
    found = {argument(node, name) for name in _INDEX_ARGUMENTS}
    return {i for group in found for i in (group if isinstance(group, (list, tuple)) else (group,))
            if isinstance(i, fx.Node)}


def _evaluate(node: fx.Node, ctx: RuleContext) -> Fact:
    encoded = _Encoding(node, ctx)
    args = fx.node.map_arg(node.args, encoded.value)
    kwargs = fx.node.map_arg(node.kwargs, encoded.value)
    with torch.no_grad():
        out = node.target(*args, **kwargs)
    if isinstance(out, torch.Tensor):
        return _fact(node, ctx, encoded, out)
    return tuple(_fact(node, ctx, encoded, piece) for piece in out)


class _Encoding:
    """Codes for the data inputs of a node; per code: token position, batch coordinate, part."""

    def __init__(self, node: fx.Node, ctx: RuleContext):
        self.ctx, self.node = ctx, node
        self.index_nodes = _index_nodes(node)
        self.positions, self.batch, self.parts = [], [], []
        self.facts = []
        self.size = 0

    def value(self, arg: fx.Node):
        """What the op gets in place of `arg` (each occurrence of a data input is a new code block)."""
        val = arg.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return concrete(val)
        if arg in self.index_nodes:
            return self.constant(arg)
        shape = tuple(concrete(s) for s in val.shape)
        fact = self.ctx.fact(arg)
        pos, batch, part = describe_elements(fact, shape, tuple(val.shape), self.ctx, len(self.facts))
        codes = torch.arange(self.size, self.size + pos.size, dtype=torch.int64).view(shape)
        self.positions.append(pos)
        self.batch.append(batch)
        self.parts.append(part)
        self.facts.append(fact)
        self.size += pos.size
        return codes

    def constant(self, arg: fx.Node) -> torch.Tensor:
        tensor = constant_tensor(self.ctx.gm, arg)
        if tensor is None:
            raise NotUnderstood("a token gather whose index is computed at run time (only constant permutations "
                                "are understood)")
        if tensor.is_meta:
            raise NotUnderstood("a constant token gather whose index lives on the meta device (no values to read: "
                                "build the model on a real device)")
        return tensor.detach().cpu()

    def decode(self, codes: torch.Tensor) -> tuple:
        flat = codes.numpy()
        pick = lambda arrays: np.concatenate(arrays)[flat]   # noqa: E731
        return pick(self.positions), pick(self.batch), pick(self.parts)


def concrete(size):
    """A size (or a structure of sizes) with symbolic sizes at their example values."""
    if isinstance(size, (list, tuple)):
        return type(size)(concrete(s) for s in size)
    if isinstance(size, torch.SymInt):
        return int(size.node.hint) if size.node.hint is not None else int(size.node.shape_env.size_hint(size.node.expr))
    return size


def _coordinate(shape: tuple, dim: int) -> np.ndarray:
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return np.broadcast_to(np.arange(shape[dim]).reshape(view), shape).reshape(-1)


def describe_elements(fact, shape: tuple, symbolic: tuple, ctx: RuleContext, which: int) -> tuple:
    """(positions, batch coordinates, parts) of every element of an input, flat."""
    size = int(np.prod(shape, dtype=np.int64))
    none = np.full(size, -1, dtype=np.int64)
    batch_dim = next((d for d in range(len(shape)) if ctx.is_batch(symbolic, d)), None)
    batch = _coordinate(shape, batch_dim) if batch_dim is not None else none
    part = np.full(size, which, dtype=np.int64)      # labels: which input, then which part of it
    if isinstance(fact, Tok):
        return fact.layout.path[_coordinate(shape, fact.dim)], batch, part
    if isinstance(fact, Grid):
        cells = _coordinate(shape, fact.hdim) * fact.width + _coordinate(shape, fact.wdim)
        return fact.layout.path[cells], batch, part
    if isinstance(fact, BatchTok):
        slots = _coordinate(shape, fact.dim)
        return fact.layout.path[slots % fact.layout.length], slots // fact.layout.length, part
    if isinstance(fact, MultiTok):
        parts = _coordinate(shape, fact.gdim) // fact.part_size(shape[fact.gdim])
        paths = np.stack([layout.path for layout in fact.layouts])
        return paths[parts, _coordinate(shape, fact.dim)], batch, part + 64 * (parts + 1)
    if isinstance(fact, MultiGrid):
        parts = _coordinate(shape, fact.gdim) // (shape[fact.gdim] // len(fact.layouts))
        paths = np.stack([layout.path for layout in fact.layouts])
        cells = _coordinate(shape, fact.hdim) * fact.width + _coordinate(shape, fact.wdim)
        return paths[parts, cells], batch, part + 64 * (parts + 1)
    if isinstance(fact, TokenMap):
        return fact.positions.reshape(-1), batch, part + 64 * (fact.parts.reshape(-1) + 1)
    if fact is None or isinstance(fact, Readout):   # a readout (a pooled summary, a copy of one token) holds no
        return none, batch, part                     # token slot of its own, as a class token's constant
    raise NotUnderstood(f"data movement of a {type(fact).__name__}")


# -- reading the result --------------------------------------------------------------------------
def _fact(node: fx.Node, ctx: RuleContext, encoded: _Encoding, codes: torch.Tensor) -> Fact:
    positions, batch, parts = encoded.decode(codes)
    length = _length(encoded.facts)
    dims = [d for d in range(positions.ndim) if varies(positions, d)]
    if not dims and (positions < 0).all():
        return None
    if set(dims) & {d for d in range(batch.ndim) if varies(batch, d)}:
        return _batch_tokens(node, ctx, encoded, positions, batch, dims, length)
    reduced = along(positions, dims)
    if len(dims) == 1 and is_permutation(reduced, length):
        return _tok(node, ctx, encoded, dims[0], Layout(reduced))
    if len(dims) == 2 and is_permutation(reduced, length):
        return _grid(encoded.facts, dims, reduced)
    if len(dims) == 2 and upsampled(reduced, along(parts, dims), length, encoded.facts):
        # a new, larger grid (VM-UNet's PatchExpand2D, a pixel shuffle): a new stage starts after it
        ctx.barrier(node)
        return None
    folded_inputs = any(isinstance(f, (MultiTok, MultiGrid)) for f in encoded.facts)
    if len(dims) == 2 or (len(dims) == 3 and folded_inputs):
        found = _folded(node, ctx, dims, reduced, parts, length, len(dims) == 3)
        if found is not None:
            return found
    grid = next((f for f in encoded.facts if isinstance(f, Grid)), None)
    if grid is not None and op_name(node) in _VIEW_OPS:
        # a Grid does not record which of its other dims hold samples (a window reverse splits the batch)
        raise NotUnderstood(grid_view_reason(node, ctx, grid))
    if not all(isinstance(f, _FOLLOWED) or f is None or isinstance(f, Readout) for f in encoded.facts):
        raise NotUnderstood(f"{describe_op(node, ctx)} moves directions folded into one tensor (or flattened batch x "
                            "tokens) in a way that is not followed")
    return TokenMap(positions, parts, length, describe_op(node, ctx))


def _length(facts: list) -> int:
    lengths = {f.length if isinstance(f, TokenMap) else
               (f.layouts[0].length if isinstance(f, (MultiTok, MultiGrid)) else f.layout.length)
               for f in facts if f is not None and not isinstance(f, Readout)}
    if len(lengths) != 1:
        raise NotUnderstood("data movement that mixes token tensors of different lengths")
    return lengths.pop()


def _tok(node: fx.Node, ctx: RuleContext, encoded: _Encoding, dim: int, layout: Layout) -> Tok:
    source = encoded.facts[0] if encoded.facts else None
    if op_name(node) in ("aten::index", "aten::index_select") and isinstance(source, Tok) and layout != source.layout:
        indexed = [d for d, i in enumerate(argument(node, "indices") or []) if i is not None]
        if source.dim != dim or (op_name(node) == "aten::index" and indexed != [source.dim]):
            raise NotUnderstood("advanced indexing that touches more than the token axis")
    return Tok(dim, layout)


def _grid(facts: list, dims: list, cells: np.ndarray) -> Grid:
    """A grid along dims (a, b); its rows along the dim that an input grid had as its rows."""
    a, b = dims
    transposed = Layout(cells.T.reshape(-1).copy())
    if any(isinstance(f, Grid) and f.layout == transposed for f in facts) and not \
            any(isinstance(f, Grid) and f.layout == Layout(cells.reshape(-1).copy()) for f in facts):
        return Grid(b, a, transposed, cells.shape[1], cells.shape[0])
    return Grid(a, b, Layout(cells.reshape(-1).copy()), cells.shape[0], cells.shape[1])


def _folded(node: fx.Node, ctx: RuleContext, dims: list, reduced: np.ndarray, parts: np.ndarray, length: int,
            grid: bool) -> Optional[Fact]:
    """Directions folded into one tensor: along one of `dims` (the direction axis) every slice is a
    permutation of the tokens; consecutive slices from one part of one input make one part."""
    for g in dims:
        rest = [d for d in dims if d != g]
        slices = np.moveaxis(reduced, dims.index(g), 0)
        if not all(is_permutation(s, length) for s in slices):
            continue
        labels = along(parts, [g])
        runs = _runs([(int(label), s.tobytes()) for label, s in zip(labels, slices)])
        if len({label for (label, _), _ in runs}) != len(runs):
            in_shape, out_shape = ctx.shape(node.args[0]), ctx.shape(node)
            raise NotUnderstood(f"{op_name(node)} interleaves directions folded into one tensor with another axis "
                                f"{tuple(in_shape)} -> {tuple(out_shape)}")
        if len({count for _, count in runs}) != 1:
            raise NotUnderstood("directions of unequal sizes (a concatenation of unequal directions, or a split that "
                                "cuts through a direction)")
        starts = np.cumsum([0] + [count for _, count in runs[:-1]])
        layouts = [Layout(slices[s].reshape(-1).copy()) for s in starts]
        if grid:
            h, w = rest
            return MultiGrid(h, w, g, tuple(layouts), slices.shape[1], slices.shape[2])
        return multi(rest[0], g, layouts)
    return None


def _runs(keys: list) -> list:
    """[(key, count), ...] of consecutive equal keys."""
    runs = []
    for key in keys:
        if runs and runs[-1][0] == key:
            runs[-1] = (key, runs[-1][1] + 1)
        else:
            runs.append((key, 1))
    return runs


def _batch_tokens(node: fx.Node, ctx: RuleContext, encoded: _Encoding, positions: np.ndarray, batch: np.ndarray,
                  dims: list, length: int) -> Fact:
    """Batch and tokens along the same dim: batch-major flattening (BatchTok), or refused."""
    if len(dims) == 1:
        row, samples = along(positions, dims), along(batch, dims)
        count = row.size // length
        if row.size % length == 0 and is_permutation(row[:length], length) \
                and np.array_equal(row, np.tile(row[:length], count)) \
                and np.array_equal(samples, np.repeat(np.arange(count), length)):
            return BatchTok(dims[0], Layout(row[:length].copy()))
    grid = next((f for f in encoded.facts if isinstance(f, Grid)), None)
    if grid is not None and op_name(node) in _VIEW_OPS:
        raise NotUnderstood(grid_view_reason(node, ctx, grid))
    if op_name(node) in _VIEW_OPS and isinstance(encoded.facts[0], Tok):
        in_shape, out_shape = ctx.shape(node.args[0]), ctx.shape(node)
        raise NotUnderstood(f"{op_name(node)} merges the token axis with other dims {in_shape} -> {out_shape}")
    raise NotUnderstood(f"{describe_op(node, ctx)} mixes the tokens of different samples (a window partition "
                        "that folds the windows into the batch is not followed)")


_VIEW_OPS = frozenset({"aten::view", "aten::reshape", "aten::_unsafe_view", "aten::flatten", "aten::unflatten",
                       "aten::view_as", "aten::reshape_as"})


def grid_view_reason(node: fx.Node, ctx: RuleContext, x: Grid) -> str:
    """Why a view of the token grid that mixes samples is refused, in terms of its dim groups."""
    name, in_shape, out_shape = op_name(node), ctx.shape(node.args[0]), ctx.shape(node)
    for gi, go in view_groups(in_shape, out_shape) or []:
        if x.hdim not in gi and x.wdim not in gi:
            continue
        if len(gi) == 1 and len(go) == 2 and all(out_shape[d] != 1 for d in go):
            return (f"{name} reshapes the token grid {in_shape} -> {out_shape} into windows (a window partition "
                    "with several windows per image is not followed; windows that cover the whole grid are)")
        if len(gi) == 2 and len(go) == 1 and all(in_shape[d] != 1 for d in gi):
            return (f"{name} reshapes the token grid {in_shape} -> {out_shape} merging windows (a window reverse "
                    "with several windows per image is not followed; windows that cover the whole grid are)")
        if not (len(gi) == 1 and len(go) == 1):
            break
    return f"{name} reshapes the token grid {in_shape} -> {out_shape}"


def describe_op(node: fx.Node, ctx: RuleContext) -> str:
    """The op and its shapes, for a refusal ("aten::view (B, 16, 8) -> (B, 2, 2, 2, 2, 8)")."""
    shape = lambda s: "(" + ", ".join(str(d) if is_static(d) else "B" for d in s) + ")"   # noqa: E731
    source = next((a for a in node.all_input_nodes if ctx.shape(a) is not None), None)
    out = ctx.shape(node)
    arrow = f" {shape(ctx.shape(source))} -> {shape(out)}" if source is not None and out is not None else ""
    return f"{op_name(node)} ({node.name}){arrow}"

