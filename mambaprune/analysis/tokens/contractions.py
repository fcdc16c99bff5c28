"""Rules for ops that contract dims (linear layers, matmuls, einsums, attention): the token axis
must pass through uncontracted."""
from __future__ import annotations

import torch.fx as fx

from ..facts import BatchTok, Fact, Grid, MultiTok, NotUnderstood, Tok, multi
from ..ops import aten, argument
from .context import RuleContext
from .registry import token_rule


@token_rule(aten.linear)
def linear(node: fx.Node, ctx: RuleContext) -> Fact:
    x = ctx.fact(node.args[0])
    last = len(ctx.shape(node.args[0])) - 1
    if isinstance(x, MultiTok) and x.gdim == last:
        raise NotUnderstood("a linear layer mixes directions folded into one tensor (parts in different orders)")
    if isinstance(x, (Tok, BatchTok, MultiTok)) and x.dim != last:
        return x
    if isinstance(x, Grid) and last not in (x.hdim, x.wdim):   # (B, H, W, C): over the channels of each cell
        return x
    raise NotUnderstood("a linear layer mixes the token axis")


@token_rule(aten.matmul, aten.bmm, aten.mm)
def matmul(node: fx.Node, ctx: RuleContext) -> Fact:
    """A token tensor times a constant matrix (tokens not in the contracted dim), or a weight times
    a token tensor whose last dim is the tokens (hustvl/Vim's `in_proj.weight @ x`)."""
    a, b = node.args[0], node.args[1]
    fa, fb = ctx.fact(a), ctx.fact(b)
    out_rank = len(ctx.shape(node))
    if isinstance(fa, MultiTok) or isinstance(fb, MultiTok):
        raise NotUnderstood("a matmul on directions folded into one tensor (only einsum and linear layers "
                            "that keep the direction axis are understood)")
    if isinstance(fa, (Tok, BatchTok)) and fb is None and fa.dim != len(ctx.shape(a)) - 1:
        return fa.shifted(out_rank - len(ctx.shape(a)))
    if isinstance(fb, (Tok, BatchTok)) and fa is None and fb.dim == len(ctx.shape(b)) - 1:
        return type(fb)(out_rank - 1, fb.layout)
    raise NotUnderstood("a matmul contracts or mixes the token axis")


@token_rule(aten.einsum)
def einsum(node: fx.Node, ctx: RuleContext) -> Fact:
    """The token letter (and a direction letter) pass through to the output; nothing sums over them."""
    equation, operands = argument(node, "equation"), list(argument(node, "tensors"))
    if "->" not in equation or "." in equation:
        raise NotUnderstood("an einsum without an explicit output (or with '...') on the token axis")
    lhs, output = equation.replace(" ", "").split("->")
    inputs = lhs.split(",")
    carriers = [k for k, op in enumerate(operands) if ctx.fact(op) is not None]
    if len(carriers) != 1 or any(len(set(t)) != len(t) for t in inputs + [output]):
        raise NotUnderstood("an einsum of two token tensors (or with a repeated index) mixes the token axis")
    k = carriers[0]
    fact, letters = ctx.fact(operands[k]), inputs[k]
    if not isinstance(fact, (Tok, MultiTok)):
        raise NotUnderstood(f"an einsum on a {type(fact).__name__}")
    token = letters[fact.dim]
    others = "".join(t for j, t in enumerate(inputs) if j != k)
    if token not in output or token in others or output[0] != letters[0]:
        raise NotUnderstood("an einsum contracts or mixes the token axis")
    if isinstance(fact, Tok):
        return Tok(output.index(token), fact.layout)
    group = letters[fact.gdim]
    if group not in output:
        raise NotUnderstood("an einsum sums over directions folded into one tensor (parts in different orders)")
    return multi(output.index(token), output.index(group), fact.layouts)


@token_rule(aten.scaled_dot_product_attention)
def attention(node: fx.Node, ctx: RuleContext) -> Fact:
    """Attention over the kept tokens is still attention: queries carry the tokens, no mask."""
    q = node.args[0]
    fact = ctx.fact(q)
    if not isinstance(fact, Tok) or fact.dim != len(ctx.shape(q)) - 2:
        raise NotUnderstood("attention whose queries do not carry the tokens")
    if argument(node, "attn_mask", None) is not None:
        raise NotUnderstood("attention with a mask over the tokens")
    return fact
