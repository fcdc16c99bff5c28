"""Rules for ops that keep the token axis where it is: identities, tuple items, pointwise ops."""
from __future__ import annotations

import operator

import torch.fx as fx

from ..facts import BatchTok, Fact, Grid, MultiGrid, MultiTok, NotUnderstood, Tok
from ..ops import IDENTITY_OPS, aten, op_name, tensor_args
from .context import RuleContext
from .registry import pointwise_rule, token_rule


def packets(names) -> list:
    """aten packets from schema names ("aten::view" -> aten.view)."""
    return [getattr(aten, name.split("::", 1)[1]) for name in sorted(names)]


@token_rule(*packets(IDENTITY_OPS))
def identity(node: fx.Node, ctx: RuleContext) -> Fact:
    return ctx.fact(node.args[0])


@token_rule(operator.getitem)
def tuple_item(node: fx.Node, ctx: RuleContext) -> Fact:
    parent = ctx.fact(node.args[0])
    return parent[node.args[1]] if isinstance(parent, tuple) else parent


@token_rule(aten.sym_size)
def size_query(node: fx.Node, ctx: RuleContext) -> Fact:
    return None


@pointwise_rule
def pointwise(node: fx.Node, ctx: RuleContext) -> Fact:
    """Every token operand, broadcast to the output's rank, must agree on axis and order."""
    out_rank = len(ctx.shape(node))
    found = []
    for arg in tensor_args(node):
        fact = ctx.fact(arg)
        if fact is None:
            continue
        if not isinstance(fact, (Tok, BatchTok, Grid, MultiTok, MultiGrid)):
            raise NotUnderstood(f"{op_name(node)} mixes a token tensor with {type(fact).__name__}")
        found.append(fact.shifted(out_rank - len(ctx.shape(arg))))
    first = found[0]
    if any(f != first for f in found[1:]):
        raise NotUnderstood(f"{op_name(node)} combines tensors whose tokens are in different orders")
    return first
