"""Rules for ops that split a tensor into several or join several into one (an allocation filled by
slice writes is refused by name). Joining token tensors in different orders side by side is how
directions get folded into one tensor (MultiTok)."""
from __future__ import annotations

import torch.fx as fx

from ..facts import Fact, MultiTok, NotUnderstood, Tok, multi, token_dims
from ..ops import aten, argument, is_static, norm_dim, op_name
from .context import RuleContext
from .registry import token_rule


@token_rule(aten.chunk, aten.split, aten.split_with_sizes, aten.tensor_split)
def split(node: fx.Node, ctx: RuleContext) -> Fact:
    """Pieces along a non-token dim; along the direction axis, each piece holds whole parts."""
    x = ctx.fact(node.args[0])
    shape = ctx.shape(node.args[0])
    dim = norm_dim(argument(node, "dim", 0), len(shape))
    pieces = node.meta["val"]
    if dim in token_dims(x):
        raise NotUnderstood(f"{op_name(node)} of the token axis")
    if isinstance(x, MultiTok) and dim == x.gdim:
        start, out = 0, []
        for piece in pieces:
            out.append(x.parts(start, start + piece.shape[dim], shape[dim]))
            start += piece.shape[dim]
        return tuple(out)
    return tuple(x for _ in pieces)


@token_rule(aten.unbind)
def unbind(node: fx.Node, ctx: RuleContext) -> Fact:
    x = ctx.fact(node.args[0])
    shape = ctx.shape(node.args[0])
    dim = norm_dim(argument(node, "dim", 0), len(shape))
    if dim in token_dims(x):
        raise NotUnderstood("unbind of the token axis")
    if isinstance(x, MultiTok):
        return tuple(x.selected(dim, i, shape[dim]) for i in range(shape[dim]))
    return tuple(x.without_dim(dim) if x is not None else None for _ in node.meta["val"])


@token_rule(aten.cat)
def cat(node: fx.Node, ctx: RuleContext) -> Fact:
    parts = argument(node, "tensors")
    dim = norm_dim(argument(node, "dim", 0), len(ctx.shape(node)))
    facts = [ctx.fact(p) for p in parts]
    if any(f is None for f in facts):
        raise NotUnderstood("concatenation of token tensors with non-token tensors")
    if any(dim in token_dims(f) for f in facts):
        raise NotUnderstood("concatenation along the token axis")
    if all(f == facts[0] for f in facts) and not isinstance(facts[0], MultiTok):
        return facts[0]
    return _concat_parts(parts, facts, dim, ctx)


@token_rule(aten.stack)
def stack(node: fx.Node, ctx: RuleContext) -> Fact:
    """Token tensors stacked along a new axis: one part per tensor (directions folded into one tensor)."""
    facts = [ctx.fact(p) for p in argument(node, "tensors")]
    dim = norm_dim(argument(node, "dim", 0), len(ctx.shape(node)))
    if dim == 0 or not all(isinstance(f, Tok) and f.dim == facts[0].dim for f in facts):
        raise NotUnderstood("stack of tensors that are not token tensors with one token axis (or along the batch)")
    first = facts[0]
    return multi(first.dim + (1 if dim <= first.dim else 0), dim, [f.layout for f in facts])


def _concat_parts(parts: list, facts: list, dim: int, ctx: RuleContext) -> Fact:
    """Token tensors in different orders side by side along `dim`: the parts of a MultiTok."""
    layouts, sizes = [], set()
    for part, fact in zip(parts, facts):
        if isinstance(fact, Tok):
            own = (fact.layout,)
        elif isinstance(fact, MultiTok) and fact.gdim == dim:
            own = fact.layouts
        else:
            raise NotUnderstood("concatenation of token tensors in different orders (or with non-token tensors)")
        if fact.dim != facts[0].dim or dim == 0:
            raise NotUnderstood("concatenation of token tensors in different orders along different axes")
        sizes.add(MultiTok(fact.dim, dim, own).part_size(ctx.shape(part)[dim]))
        layouts.extend(own)
    if len(sizes) != 1:
        raise NotUnderstood("concatenation of directions of unequal sizes")
    return multi(facts[0].dim, dim, layouts)


_WRITES = ("aten::copy_", "aten::index_put_", "aten::index_put", "aten::fill_")


@token_rule(aten.new_empty, aten.new_zeros, aten.new_ones, aten.new_full, aten.empty_like, aten.zeros_like,
            aten.ones_like, aten.full_like)
def allocation(node: fx.Node, ctx: RuleContext) -> Fact:
    """A tensor allocated after a token tensor and filled by slice writes (VMamba's torch cross-scan:
    `y = x.new_empty((B, 4, C, L)); y[:, 0] = ...`) is a stack the compiler does not follow: refused,
    naming the allocation, its writes and the axis they run along."""
    shape = "(" + ", ".join(str(s) if is_static(s) else "B" for s in ctx.shape(node)) + ")"
    writes, dims = [], set()
    for user in node.users:
        if op_name(user) in _WRITES and user.args[0] is node:
            writes.append(user)
        elif op_name(user) in ("aten::select", "aten::slice"):
            dims.add(norm_dim(argument(user, "dim", 0), len(ctx.shape(node))))
            writes.extend(w for w in user.users if op_name(w) in _WRITES and w.args[0] is user)
    if not writes:
        raise NotUnderstood(f"{op_name(node)} allocates a {shape} tensor after a token tensor (only elementwise ops, "
                            "views and the ops of the design notes are followed)")
    along = f" along dim {', '.join(map(str, sorted(dims)))}" if dims else ""
    raise NotUnderstood(
        f"a {shape} tensor built by {op_name(node)} and {len(writes)} slice writes{along} "
        f"({', '.join(w.name for w in writes)}): which tokens each slice holds is not followed; route the "
        "function that builds it (as csm_triton's cross_scan_fn is routed) or write it with torch.stack / torch.cat")
