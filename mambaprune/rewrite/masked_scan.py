"""The scan of the masked formulation (masked_hold.py): step sizes laid out like each scan operand, the gaps
`decay` adds across pruned steps, and a scan whose operands are in different token orders (a zip,
analysis/tokens/scans.py) moved to u's slots."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.fx as fx

from ..analysis import Tok, fact_of
from ..analysis.facts import MultiTok
from ..analysis.ops import argument, call_argument, scan_signature, with_argument
from .masks import path_of


def along(bias: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """A 1-D bias shaped to broadcast along `axis` of an ndim-dim step size."""
    shape = [1] * ndim
    shape[axis] = -1
    return bias.reshape(shape)


def _per_group_layouts(fact, groups: int) -> Optional[tuple]:
    layouts = (fact.layout,) if isinstance(fact, Tok) else getattr(fact, "layouts", None)
    if layouts is None or groups % len(layouts):
        return None
    return tuple(layout for layout in layouts for _ in range(groups // len(layouts)))


def scan_operands_agree(node: fx.Node) -> bool:
    """Whether every token operand of the scan holds, per channel group, the tokens in one order
    (so that step t of every operand is the same token); False for a zip of different orders."""
    names = scan_signature(node).token_operands
    facts = [fact_of(argument(node, name)) for name in names if argument(node, name) is not None]
    if not all(isinstance(f, (Tok, MultiTok)) for f in facts):
        return False
    groups = int(np.lcm.reduce([len(getattr(f, "layouts", (None,))) for f in facts]))
    expanded = {_per_group_layouts(f, groups) for f in facts}
    return len(expanded) == 1 and None not in expanded


def zipped_to_u(n: fx.Node, keep: torch.Tensor, args, kwargs) -> Optional[tuple]:
    """(args, kwargs) of a scan whose operands are in different orders (a zip, analysis/tokens/scans.py)
    with every operand moved to u's slots: the j-th kept token of each operand's own order goes to
    the slot of the j-th kept token of u's order (step j of the pruned scan pairs them; docs/
    architecture.md "Scans whose operands are in different orders"); None when an operand is not
    one token axis in one order."""
    signature = scan_signature(n)
    u_fact = fact_of(argument(n, signature.input))
    if not isinstance(u_fact, Tok):
        return None
    args, kwargs = tuple(args), dict(kwargs)
    to = keep[:, path_of(u_fact.layout)]
    for name in signature.token_operands:
        fact = fact_of(argument(n, name))
        if fact is None or fact == u_fact:
            continue
        if not isinstance(fact, Tok):
            return None
        value = call_argument(n.target, args, kwargs, name)
        source, moved = keep[:, path_of(fact.layout)], torch.zeros_like(value)
        for b in range(value.shape[0]):
            moved[b][..., to[b]] = value[b][..., source[b]]
        args, kwargs = with_argument(n.target, args, kwargs, name, moved)
    return args, kwargs


def path_gaps_dense(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) float32: at each kept slot of a path, the steps since the previous kept slot (the first:
    its slot + 1); pruned slots get 1 (their delta is 0 anyway)."""
    slots = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    marked = torch.where(mask, slots, torch.full_like(slots, -1))
    last = torch.cummax(marked, dim=-1).values
    before = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=-1)
    return torch.where(mask, slots - before, torch.ones_like(slots)).to(torch.float32)
