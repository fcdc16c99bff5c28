"""An allocation filled by slice writes after a token tensor: refused by name. (Splitting a tensor
into several and joining several into one are data movement: movement.py.)"""
from __future__ import annotations

import torch.fx as fx

from ..facts import Fact, NotUnderstood
from ..ops import aten, argument, is_static, norm_dim, op_name
from .context import RuleContext
from .registry import token_rule


_WRITES = ("aten::copy_", "aten::index_put_", "aten::index_put", "aten::fill_")


@token_rule(aten.new_empty, aten.new_zeros, aten.new_ones, aten.new_full, aten.empty_like, aten.zeros_like,
            aten.ones_like, aten.full_like)
def allocation(node: fx.Node, ctx: RuleContext) -> Fact:
    """A tensor allocated after a token tensor and filled by slice writes (VMamba's torch cross-scan:
    `y = x.new_empty((B, 4, C, L)); y[:, 0] = ...`) is a stack the compiler does not follow: refused,
    naming the allocation, its writes and the axis they run along."""
    shape = "(" + ", ".join(str(s) if is_static(s) else "B" for s in ctx.shape(node)) + ")"
    writes, dims, strided = [], set(), False
    views = [(node, list(range(len(ctx.shape(node)))))]     # a view and which allocation axis each of its axes is
    while views:
        view, axes = views.pop()
        for user in view.users:
            if op_name(user) in _WRITES and user.args[0] is view:
                writes.append(user)
            elif op_name(user) in ("aten::select", "aten::slice") and user.args[0] is view:
                dim = norm_dim(argument(user, "dim", 0), len(axes))
                dims.add(axes[dim])
                strided = strided or (op_name(user) == "aten::slice" and argument(user, "step", 1) not in (None, 1))
                views.append((user, axes[:dim] + axes[dim + 1:] if op_name(user) == "aten::select" else axes))
    if not writes:
        raise NotUnderstood(f"{op_name(node)} allocates a {shape} tensor after a token tensor (only elementwise ops, "
                            "views and the ops of the design notes are followed)")
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    writes.sort(key=order.__getitem__)
    along = f" along dim {', '.join(map(str, sorted(dims)))}" if dims else ""
    kind = "strided slice writes" if strided else "slice writes"
    raise NotUnderstood(
        f"a {shape} tensor built by {op_name(node)} and {len(writes)} {kind}{along} "
        f"({', '.join(w.name for w in writes)}): which tokens each slice holds is not followed; route the "
        "function that builds it (as csm_triton's cross_scan_fn is routed) or write it with torch.stack / torch.cat")
