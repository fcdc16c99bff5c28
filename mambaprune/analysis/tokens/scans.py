"""The rule for the selective scan: every operand carries the tokens on its last axis, all in one
order, or (grouped B/C) channel group g of every operand in the group's own order (MultiTok)."""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ..facts import Fact, MultiTok, NotUnderstood, Tok, multi
from ..ops import argument
from .context import RuleContext
from .registry import token_rule

SCAN_TOKEN_OPERANDS = ("u", "delta", "B", "C", "z")


@token_rule(torch.ops.mambaprune.selective_scan)
def selective_scan(node: fx.Node, ctx: RuleContext) -> Fact:
    per_group = []
    for name in SCAN_TOKEN_OPERANDS:
        operand = argument(node, name)
        if operand is None:
            continue
        fact, rank = ctx.fact(operand), len(ctx.shape(operand))
        if not isinstance(fact, (Tok, MultiTok)) or fact.dim != rank - 1:
            raise NotUnderstood(f"selective scan input {name} does not carry the tokens on its last axis")
        if isinstance(fact, MultiTok) and (fact.gdim != 1 or name in ("B", "C") and rank != 4):
            raise NotUnderstood(f"selective scan input {name} holds token orders along an axis that is not "
                                "its channel / group axis")
        per_group.append(fact.layouts if isinstance(fact, MultiTok) else (fact.layout,))
    count = int(np.lcm.reduce([len(p) for p in per_group]))
    expanded = {tuple(layout for layout in p for _ in range(count // len(p))) for p in per_group}
    if len(expanded) != 1:
        raise NotUnderstood("selective scan inputs are in different token orders (the channel groups of u, "
                            "delta and z do not match the groups of B/C in order)")
    return multi(2, 1, expanded.pop())
