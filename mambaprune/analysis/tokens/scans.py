"""The rule for the selective scan.

Every operand (u, delta, B, C, z) carries the tokens on its last axis. Usually they are all in
one order (the scan runs along that path), or, for a grouped scan (B, C of shape (B, G, N, L)),
channel group g of every operand is in the group's own order (VMamba's cross-scan: MultiTok).

An operand may also be in another order than u: PlainMamba's official layer scans
`x[:, order]` (u in path order) with dt, B and C left in raster order, so step t of the scan
pairs the input of token order[t] with the step size and projections of token t. The scan is
then a zip of its operands slot by slot, and its output is in u's order: after pruning, every
operand holds the kept tokens sorted along its own order, and step k of the pruned scan pairs the
k-th kept token of each (DESIGN notes, docs/architecture.md "Scans whose operands are in
different orders"). With every token kept this is exactly the dense scan.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ..facts import Fact, MultiTok, NotUnderstood, Tok, multi
from ..ops import SSD_SCAN, argument
from .context import RuleContext
from .registry import token_rule

SCAN_TOKEN_OPERANDS = ("u", "delta", "B", "C", "z")


@token_rule(torch.ops.mambaprune.selective_scan)
def selective_scan(node: fx.Node, ctx: RuleContext) -> Fact:
    facts = {}
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
        facts[name] = fact
    grouped = _grouped_layouts(list(facts.values()))
    if grouped is not None:
        return multi(2, 1, grouped)
    if all(isinstance(f, Tok) for f in facts.values()):
        return Tok(2, facts["u"].layout)   # operands in different orders: a zip, in u's order
    raise NotUnderstood("selective scan inputs are in different token orders (the channel groups of u, "
                        "delta and z do not match the groups of B/C in order)")


def _grouped_layouts(facts: list):
    """The per-channel-group layouts when every operand agrees on them, else None."""
    per_group = [f.layouts if isinstance(f, MultiTok) else (f.layout,) for f in facts]
    count = int(np.lcm.reduce([len(p) for p in per_group]))
    expanded = {tuple(layout for layout in p for _ in range(count // len(p))) for p in per_group}
    return expanded.pop() if len(expanded) == 1 else None


@token_rule(torch.ops.mambaprune.ssd_scan)
def ssd_scan(node: fx.Node, ctx: RuleContext) -> Fact:
    """The SSD (Mamba-2) scan: every operand (x, dt, B, C, z) carries the tokens on axis 1, all in
    one order, the output's. Operands in different orders (a zip, as PlainMamba's selective scans)
    are refused: no SSD model is known to scan that way."""
    layouts = {}
    for name in SSD_SCAN.token_operands:
        operand = argument(node, name)
        if operand is None:
            continue
        fact = ctx.fact(operand)
        if not isinstance(fact, Tok) or fact.dim != SSD_SCAN.token_axis:
            raise NotUnderstood(f"SSD scan input {name} does not carry the tokens on axis 1 in one token order")
        layouts[name] = fact.layout
    if len(set(layouts.values())) != 1:
        raise NotUnderstood("SSD scan inputs are in different token orders: " + ", ".join(layouts))
    return Tok(1, layouts["x"])
