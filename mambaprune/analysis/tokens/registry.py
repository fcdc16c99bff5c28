"""The token-rule registry: one small pure function per op (family), keyed by the op.

    @token_rule(aten.permute, aten.transpose)
    def permute(node, ctx) -> Fact: ...

A rule receives the node and a `RuleContext`; it returns the fact of the node's output, or raises
`NotUnderstood` on purpose (that, and only that, becomes a refusal). Lookup order, in one place
(`rule_for`): a rule registered for the exact overload, then for its overload packet, then the
pointwise rule for ops tagged `torch.Tag.pointwise`; anything else is not understood.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.fx as fx

from ..facts import Fact
from ..ops import is_pointwise
from .context import RuleContext

Rule = Callable[[fx.Node, RuleContext], Fact]

_RULES: dict = {}
_POINTWISE: list = []


def token_rule(*targets) -> Callable[[Rule], Rule]:
    """Register a rule for op overloads, overload packets or plain callables (operator.getitem)."""
    def register(rule: Rule) -> Rule:
        for target in targets:
            if target in _RULES:
                raise ValueError(f"a token rule for {target} is already registered ({_RULES[target].__name__})")
            _RULES[target] = rule
        return rule
    return register


def pointwise_rule(rule: Rule) -> Rule:
    """Register the rule for every op tagged pointwise that has no rule of its own."""
    _POINTWISE[:] = [rule]
    return rule


def overloads_without_tag(packet, tag) -> list:
    """The overloads of `packet` that lack `tag` (e.g. the reductions of aten.max, not its
    elementwise `max.other`)."""
    return [getattr(packet, name) for name in packet.overloads() if tag not in getattr(packet, name).tags]


def rule_for(node: fx.Node) -> Optional[Rule]:
    target = node.target
    rule = _RULES.get(target)
    if rule is None and isinstance(target, torch._ops.OpOverload):
        rule = _RULES.get(target.overloadpacket)
    if rule is None and is_pointwise(node) and _POINTWISE:
        rule = _POINTWISE[0]
    return rule


def registered_targets() -> list:
    return list(_RULES)
