"""The per-token chain from a residual stream to a value computed from it token by token.

`fill="carry"` restores such a value by re-running the chain on the stream carried to full length
(rewrite/restore.py; the masked run does the same, rewrite/masked_hold.py), so the chain runs densely
in the pruned graph: the planner counts it so (`GraphAnalysis.carried_chain`).
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx

from .sites import is_per_token


def ancestors_where(old: fx.Node, holds) -> set:
    """`old` and its ancestors reached through nodes for which `holds` is true (those nodes only)."""
    seen, stack = set(), [old]
    while stack:
        node = stack.pop()
        if node in seen or not holds(node):
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def stream_and_chain(old: fx.Node, pruned: set, is_stream) -> Optional[tuple]:
    """(stream, chain): the latest node of `pruned` (`old` and its ancestors holding pruned tokens) that
    `is_stream`, and the per-token ops from it to `old` (per_token_chain); None when there are none."""
    stream = next((n for n in sorted(pruned, key=graph_order(old), reverse=True) if is_stream(n)), None)
    chain = None if stream is None else per_token_chain(stream, old, pruned)
    return None if chain is None else (stream, chain)


def per_token_chain(stream: fx.Node, old: fx.Node, pruned: set) -> Optional[list]:
    """The nodes after `stream` up to `old` (the pruned ancestors of `old` that `stream` reaches), in graph
    order, when each is a per-token op whose pruned inputs are the stream or nodes of the chain; else None."""
    between, stack = set(), [u for u in stream.users if u in pruned]
    while stack:
        node = stack.pop()
        if node not in between:
            between.add(node)
            stack.extend(u for u in node.users if u in pruned)
    allowed = between | {stream}
    chain = sorted(between, key=graph_order(old))
    for node in chain:
        if not is_per_token(node) or any(a in pruned and a not in allowed for a in node.all_input_nodes):
            return None
    return chain


def graph_order(old: fx.Node):
    order = {n: i for i, n in enumerate(old.graph.nodes)}
    return order.__getitem__
