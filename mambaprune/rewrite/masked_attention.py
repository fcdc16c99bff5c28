"""Attention in the masked formulation (masked_hold.py): scaled_dot_product_attention over the tokens, run
on the dense tensors, attends to what the pruned graph's attention over the K kept tokens attends to.

The pruned graph runs the same sdpa on the kept tokens, in the order each operand keeps them along its
token axis. Said on the dense tensors: a query attends to the kept keys only; under `is_causal`, the
j-th kept query (in the query's order) attends to the first j + 1 kept keys (in the key's order), which
for one layout is "kept keys at or before the query". The rows of pruned queries are not what the
pruned graph computes (nothing reads them as kept tokens); a pruned query before every kept key attends
to all kept keys, so that no row is empty (an empty row is NaN, which a later mask would not clear).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from ..analysis import Tok, fact_of
from ..analysis.ops import argument, call_argument, with_argument
from .masks import mask_like


def _token_mask(node: fx.Node, value: torch.Tensor, keep: torch.Tensor) -> Optional[torch.Tensor]:
    """(B, 1.., L, 1) bool: True where the query / key / value `node` holds a kept token; None where its
    token axis is not the one before the features."""
    fact = fact_of(node)
    if not isinstance(fact, Tok) or fact.dim != value.dim() - 2:
        return None
    return mask_like(fact, tuple(value.shape), keep)


def _rank(mask: torch.Tensor) -> torch.Tensor:
    """The index of each slot among the kept slots before it, along the token axis (-2)."""
    return mask.to(torch.int64).cumsum(-2) - 1


def attention_mask(n: fx.Node, keep: torch.Tensor, args, kwargs) -> tuple:
    """(the boolean attn_mask (B, 1.., Lq, Lk) of the pruned graph's attention, None) or (None, reason)."""
    if argument(n, "attn_mask") is not None:
        return None, "attention over the tokens with its own mask"
    key_node, query_node = argument(n, "key"), argument(n, "query")
    if fact_of(key_node) != fact_of(argument(n, "value")):
        return None, "attention whose keys and values are in different orders"
    keys = _token_mask(key_node, call_argument(n.target, args, kwargs, "key"), keep)
    if keys is None:
        return None, "attention whose keys could not be masked"
    allowed = keys.transpose(-1, -2)                                  # (B, 1.., 1, Lk)
    if argument(n, "is_causal", False):
        queries = _token_mask(query_node, call_argument(n.target, args, kwargs, "query"), keep)
        if queries is None:
            return None, "causal attention whose queries could not be masked"
        causal = allowed & (_rank(keys).transpose(-1, -2) <= _rank(queries))
        allowed = torch.where(causal.any(-1, keepdim=True), causal, allowed)   # a pruned query before every kept key
    return allowed, None


def masked_attention(n: fx.Node, keep: torch.Tensor, args, kwargs) -> tuple:
    """(the value of sdpa `n` as the pruned graph computes it at kept queries, reason it is not defined or None)."""
    mask, reason = attention_mask(n, keep, args, kwargs)
    if mask is None:
        return n.target(*args, **kwargs), f"{n.name}: {reason} (no masked formulation)"
    args, kwargs = with_argument(n.target, tuple(args), dict(kwargs), "attn_mask", mask)
    args, kwargs = with_argument(n.target, args, kwargs, "is_causal", False)
    return n.target(*args, **kwargs), None
