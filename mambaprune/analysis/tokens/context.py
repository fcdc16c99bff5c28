"""What a token rule may read, and the only side effects it may have.

Rules read facts of their inputs, shapes and constant values through the context, and record
everything beyond their output's fact through it: a protected position (a class token, a token
read by a constant index), a barrier (a downsampling between stages), a fact about a node
(`annotate`: meta_keys.PERMUTATION, CONV_LEFT, CONV_SLICE).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.fx as fx

from ..facts import Fact, NotUnderstood, fact_of
from ..ops import is_static, shape_of


class RuleContext:
    def __init__(self, gm: fx.GraphModule, token_lengths: set, batch: Optional[int] = None):
        self.gm = gm
        # a scan over one token (a 1 x 1 last stage) gives no token axis to seed: a size-1 dim is as
        # likely a broadcast one (a pooled gate (B, 1, C)), and one token has nothing to prune
        self.token_lengths = frozenset(length for length in token_lengths if length > 1)
        self.batch = batch                 # the batch of a graph captured with it fixed (None: dynamic)
        self.protected: set = set()        # original positions that must never be pruned
        self.class_tokens: set = set()
        self.barriers: list = []           # nodes a pruning site must precede (downsampling between stages)
        self.input_dependent: set = set()  # nodes computed from the model's inputs
        self.summaries: set = set()        # nodes computed from token readouts (a pooled gate): never seeds
        self.evaluated: dict = {}          # movement.py: facts of moves already evaluated, by op and inputs
        self._nodes = {node.name: node for node in gm.graph.nodes}

    # -- reading ---------------------------------------------------------------------------------
    def fact(self, value) -> Fact:
        return fact_of(value) if isinstance(value, fx.Node) else None

    def shape(self, value) -> Optional[tuple]:
        return shape_of(value)

    def is_batch(self, shape, dim: int) -> bool:
        """Whether dim `dim` of `shape` is the batch: the dynamic dim or, in a graph captured with the
        batch fixed, dim 0 when it has that size."""
        if not is_static(shape[dim]):
            return True
        return self.batch is not None and dim == 0 and shape[0] == self.batch

    def is_input_dependent(self, node) -> bool:
        return node in self.input_dependent

    def constant(self, value) -> np.ndarray:
        """The flat int64 value of a node computed from graph constants only (a constant index)."""
        tensor = constant_tensor(self.gm, value)
        if tensor is None:
            raise NotUnderstood("a token gather whose index is computed at run time (only constant permutations "
                                "are understood)")
        if tensor.is_meta:
            raise NotUnderstood("a constant token gather whose index lives on the meta device (no values to read: "
                                "build the model on a real device)")
        return tensor.detach().cpu().numpy().astype(np.int64).reshape(-1)

    # -- side effects ----------------------------------------------------------------------------
    def protect(self, positions) -> None:
        self.protected.update(positions)

    def mark_class_tokens(self, positions) -> None:
        self.class_tokens.update(positions)
        self.protected.update(positions)

    def barrier(self, node: fx.Node) -> None:
        self.barriers.append(node)

    def annotate(self, node, key: str, value) -> None:
        """Record a fact about `node` (a node or a node's name) in its meta."""
        target = self._nodes[node] if isinstance(node, str) else node
        target.meta[key] = value


def constant_tensor(gm: fx.GraphModule, node, _depth: int = 0) -> Optional[torch.Tensor]:
    """The value of a node computed only from graph constants (buffers, literals), if it is one.

    Parameters count as constants too: an index computed from them would not depend on the input.
    """
    if not isinstance(node, fx.Node):
        return torch.as_tensor(node) if isinstance(node, (list, tuple)) else None
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, torch.Tensor) else None
    if node.op != "call_function" or _depth > 32:
        return None
    values = {}
    for inp in node.all_input_nodes:
        value = constant_tensor(gm, inp, _depth + 1)
        if value is None:
            return None
        values[inp] = value
    args = fx.node.map_arg(node.args, values.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
    with torch.no_grad():
        out = node.target(*args, **kwargs)
    return out if isinstance(out, torch.Tensor) else None
