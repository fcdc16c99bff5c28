"""Dense moves: data movement that the kept tokens cannot follow runs on the restored dense tensor.

A move that spreads the tokens over several axes (a token axis viewed as windows and permuted, a
class token cut out, directions side by side on the token axis), or that brings them into an order
whose restriction to the kept tokens is not the moved pruned tensor (a roll, a flip of one grid
axis), cannot be applied to K kept tokens. Its pruned inputs are put back at their dense slots
(zeros at pruned positions: rewrite/restore.py's `scattered`; no fill is needed, the pruned slots are never
read as tokens) and the move runs densely; wherever its result meets the pruned
tokens again as a token axis or grid, the kept tokens are gathered from it (gather.py), in the
order the move produced. With every token kept this is the dense graph.

    pruned x (K) -> scatter (L) -> view / permute / reshape (dense) -> gather (K, in the new order)
"""
from __future__ import annotations

import torch.fx as fx

from ...analysis import Grid, Tok, TokenMap, fact_of
from ...analysis.ops import op_name
from ...analysis.tokens.movement import is_movement
from ...meta_keys import PERMUTATION
from ..context import SiteContext
from ..restore import scattered
from .base import RewriteRule


class RestoreBeforeMoving(RewriteRule):
    def matches(self, ctx: SiteContext, old: fx.Node, args: tuple) -> bool:
        if not is_movement(old) or not needs_dense(old):
            return False
        return any(_restorable(ctx, a) for a in _flat(args))

    def emit(self, ctx: SiteContext, old: fx.Node, args: tuple, kwargs: dict) -> fx.Node:
        restore = lambda a: _restored(ctx, a) if _restorable(ctx, a) else a   # noqa: E731
        args = fx.node.map_arg(args, restore)
        kwargs = fx.node.map_arg(kwargs, restore)
        return ctx.graph.create_node(old.op, old.target, args, kwargs, name=old.name)


def needs_dense(old: fx.Node) -> bool:
    """Whether the move cannot be applied to the kept tokens as they are."""
    out = fact_of(old)
    if isinstance(out, tuple):
        return any(isinstance(f, TokenMap) for f in out)
    if isinstance(out, TokenMap):
        return True
    source = next((fact_of(a) for a in old.all_input_nodes if isinstance(fact_of(a), (Tok, Grid))), None)
    if not isinstance(out, (Tok, Grid)) or source is None or out.layout == source.layout:
        return False
    if PERMUTATION in old.meta or (isinstance(source, Grid) and isinstance(out, Tok)):
        return False    # ReorderTokens, leave_grid
    return not (op_name(old) == "aten::flip" and isinstance(out, Tok) and out.layout == source.layout.reversed())


def _flat(args) -> list:
    out = []
    fx.node.map_arg(args, out.append)
    return out


def _restorable(ctx: SiteContext, value) -> bool:
    state = ctx.state.of(value)
    return state is not None and isinstance(state.fact, (Tok, Grid))


def _restored(ctx: SiteContext, value: fx.Node) -> fx.Node:
    def build():
        fact = ctx.state.of(value).fact
        return scattered(ctx, value, fact, ctx.tables.dense_index(ctx.site, fact.layout))
    return ctx.cached(("restored", value, ctx.site), build)
