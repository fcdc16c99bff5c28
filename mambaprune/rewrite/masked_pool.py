"""Pooling of the tokens in the masked formulation (masked_hold.py): a readout that pools the tokens (the
analysis' `Readout("pool")`: a mean, sum or max over the token axis, a global adaptive pool of the grid)
reads the kept tokens only, as the pruned graph's pooling of its K tokens does.

A max is the op itself run with -inf at the pruned tokens (where a model reads where the maximum is, the
analysis has the tokens restored before the max: analysis/tokens/reductions.py).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..analysis import Readout, fact_of
from ..analysis.ops import argument, op_name
from .masks import mask_like

_ADAPTIVE = {"aten::adaptive_avg_pool2d": 2, "aten::adaptive_avg_pool1d": 1}
_MAXIMA = ("aten::amax", "aten::max", "aten::adaptive_max_pool2d")


def pools_tokens(node: fx.Node) -> bool:
    """Whether `node` is a readout that pools the tokens (the analysis' fact)."""
    fact = fact_of(node)
    return isinstance(fact, Readout) and fact.kind == "pool"


def _reduction(n: fx.Node, x: torch.Tensor) -> tuple:
    """(the reduction a mean or sum pooling node `n` makes of `x`: "aten::mean" or "aten::sum", its dims,
    keepdim)."""
    name = op_name(n)
    if name in _ADAPTIVE:
        return "aten::mean", list(range(x.dim() - _ADAPTIVE[name], x.dim())), True
    dims = argument(n, "dim", None)
    dims = list(range(x.dim())) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
    return name, dims, argument(n, "keepdim", False)


def masked_pool(n: fx.Node, keep: torch.Tensor, args, kwargs) -> tuple:
    """(pooling `n`'s value over the kept tokens, reason it is not defined or None)."""
    x, name = args[0], op_name(n)
    mask = mask_like(fact_of(n.args[0]), tuple(x.shape), keep)
    if mask is not None and name in _MAXIMA:
        masked = torch.where(mask.expand_as(x), x, torch.full_like(x, -torch.inf))
        return n.target(masked, *args[1:], **kwargs), None
    reduction, dims, keepdim = _reduction(n, x)
    if mask is None or reduction not in ("aten::mean", "aten::sum"):
        return n.target(*args, **kwargs), f"{n.name}: a pooling of the tokens ({name}) with no masked formulation"
    dtype = kwargs.get("dtype")
    x = x if dtype is None else x.to(dtype)         # the reduction's accumulation type, as the op casts it
    mask = mask.expand_as(x)
    value = (x * mask).sum(dims, keepdim=keepdim)
    if reduction == "aten::mean":
        value = value / mask.to(x.dtype).sum(dims, keepdim=keepdim)
    return value, None
