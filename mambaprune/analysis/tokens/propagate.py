"""Token-axis propagation over an exported (ATen) graph: seeds, then one rule per node.

For every node this decides, from the graph alone, which dimension of its output is the token axis
and in which layout the tokens sit (facts.py), and records it in `node.meta[meta_keys.TOKENS]`.
Nodes whose inputs carry no tokens are seeds (seeds.py); the others get the fact their op's rule
returns (registry.py; the rules are in the files beside this one, by op family). A node that reads
an `Unknown` is `Unknown` for the same reason; a rule that raises `NotUnderstood` makes its node
`Unknown`. Any other exception in a rule is a bug and is raised as `TokenRuleError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ...errors import TokenRuleError
from ...meta_keys import TOKENS
from ..facts import Fact, NotUnderstood, PaddedTok, Readout, TokenMap, Unknown, is_token_fact
from ..ops import IDENTITY_OPS, is_pointwise, op_name, tensor_args
from . import (combining, contractions, convolutions, elementwise, indexing, movement, reductions,  # noqa: F401
               scans)
from .context import RuleContext
from .registry import rule_for
from .seeds import seed


@dataclass
class TokenFlow:
    """What the propagation found besides the per-node facts."""

    protected: set
    class_tokens: set
    barriers: list


def propagate_tokens(gm: fx.GraphModule, token_lengths: set, batch: Optional[int] = None) -> TokenFlow:
    """Fill node.meta[TOKENS] for every node of `gm` (token_lengths: the scans' sequence lengths;
    batch: the fixed batch of a graph captured with it, None when the batch is dynamic)."""
    ctx = RuleContext(gm, token_lengths, batch)
    for node in gm.graph.nodes:
        if carries_data(node) and (node.op == "placeholder" or any(ctx.is_input_dependent(a) for a in tensor_args(node))):
            ctx.input_dependent.add(node)
        node.meta[TOKENS] = infer(node, ctx)
    return TokenFlow(ctx.protected, ctx.class_tokens, ctx.barriers)


def carries_data(node: fx.Node) -> bool:
    """Whether the node's value can carry the input's data: a size (a SymInt read off a tensor's
    shape) cannot, so a parameter expanded to the batch size (a class token, a positional table)
    stays a constant of the model, not a function of the image."""
    return not isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def infer(node: fx.Node, ctx: RuleContext) -> Fact:
    if node.op != "call_function":
        return None
    facts = [ctx.fact(a) for a in tensor_args(node)]
    unknown = next((f for f in facts if isinstance(f, Unknown)), None)
    if unknown is not None:
        return Unknown(unknown.reason)
    if not any(is_token_fact(f) or isinstance(f, tuple) for f in facts):
        if any(isinstance(f, Readout) or a in ctx.summaries for a, f in zip(tensor_args(node), facts)):
            ctx.summaries.add(node)     # computed from a token readout: no token axis, whatever its sizes
            return None
        return seed(node, ctx)
    try:
        return apply_rule(node, ctx)
    except NotUnderstood as err:
        return Unknown(str(err))


def apply_rule(node: fx.Node, ctx: RuleContext) -> Fact:
    first = ctx.fact(node.args[0]) if node.args else None
    if isinstance(first, PaddedTok) and op_name(node) not in ("aten::slice", "getitem"):
        raise NotUnderstood(f"{op_name(node)} on a padded conv1d output (expected the slice back to L tokens)")
    spread = next((f for f in (ctx.fact(a) for a in tensor_args(node)) if isinstance(f, TokenMap)), None)
    if spread is not None and not (movement.is_movement(node) or is_pointwise(node) or op_name(node) in IDENTITY_OPS):
        raise NotUnderstood(f"{op_name(node)} on tokens it cannot follow: {spread.refusal}")
    rule = rule_for(node)
    if rule is None:
        raise NotUnderstood(f"{op_name(node)} on the token axis is not a rewrite the compiler knows")
    try:
        return rule(node, ctx)
    except NotUnderstood:
        raise
    except Exception as err:
        raise TokenRuleError(
            f"mambaprune's token rule {rule.__name__} failed on {node.name} ({op_name(node)}): "
            f"{type(err).__name__}: {err}. This is a bug in mambaprune; please report it with the model.") from err
