"""Rules for ops that keep the token axis where it is: identities, tuple items, pointwise ops."""
from __future__ import annotations

import operator

import numpy as np

import torch.fx as fx

from ..facts import BatchTok, Fact, Grid, MultiGrid, MultiTok, NotUnderstood, Tok, TokenMap
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
    if any(isinstance(ctx.fact(a), TokenMap) for a in tensor_args(node)):
        return _spread(node, ctx)
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


def _spread(node: fx.Node, ctx: RuleContext) -> TokenMap:
    """A pointwise op on tokens spread by data movement (a stream with a class token cut out and put
    back): every token operand must hold the same tokens in the same places."""
    facts = [ctx.fact(a) for a in tensor_args(node) if ctx.fact(a) is not None]
    if not all(isinstance(f, TokenMap) for f in facts):
        raise NotUnderstood(f"{op_name(node)} combines tokens spread by data movement with a token tensor "
                            f"({facts[0].refusal if isinstance(facts[0], TokenMap) else facts[-1].refusal})")
    shape = np.broadcast_shapes(*(f.positions.shape for f in facts))
    first = facts[0]
    positions = np.broadcast_to(first.positions, shape)
    if any(not np.array_equal(np.broadcast_to(f.positions, shape), positions) for f in facts[1:]):
        raise NotUnderstood(f"{op_name(node)} combines tensors whose tokens are in different places")
    return TokenMap(positions, np.broadcast_to(first.parts, shape), first.length, first.origin)
