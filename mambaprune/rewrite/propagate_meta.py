"""Propagate: every node of a rewritten graph gets `meta["val"]`, a fake tensor of its output.

The rewrite emits nodes from plain functions (runtime/token_index.py) that carry no metadata;
later passes and backends read shapes from `meta["val"]`, as they can on the captured graph.
Fake-tensor propagation (torch.fx's FakeTensorProp) runs in a fresh FakeTensorMode with its own
ShapeEnv, the batch dim of every input symbolic like the captured graph's, so nothing is added to
the captured program's shape environment.

Invariant: the graph is not changed (modified is False); afterwards every placeholder and
call_function node carries a `val` (None for ops that return nothing, as in the captured graph).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..pass_infra import GraphPass, InvariantError, PassResult, exclusive_compile, release_shape_env_caches


class PropagateMeta(GraphPass):
    def __init__(self, example_inputs: list):
        self.example_inputs = example_inputs   # flat graph inputs

    def call(self, gm: fx.GraphModule) -> PassResult:
        with exclusive_compile():   # builds hold the lock already; direct callers of the pass too
            self._propagate(gm)
        return PassResult(gm, False)

    def _propagate(self, gm: fx.GraphModule) -> None:
        mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
        # FakeTensorMode's dispatch cache is shared by every mode of the process and keyed by this
        # mode's own symbols: it would grow with every build and never be hit again
        mode.cache_enabled = False
        fakes = [_fake(mode, x) for x in self.example_inputs]
        try:
            with torch.no_grad():
                FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
        finally:
            release_shape_env_caches()
        for node in gm.graph.nodes:     # ops that return nothing (checks) carry val None, as in export
            if node.op == "call_function":
                node.meta.setdefault("val", None)

    def ensures(self, gm: fx.GraphModule) -> None:
        missing = [n.name for n in gm.graph.nodes if n.op in ("placeholder", "call_function") and "val" not in n.meta]
        if missing:
            raise InvariantError(f"nodes without meta['val'] after the propagation: {missing[:5]}")


def _fake(mode: FakeTensorMode, x):
    if not isinstance(x, torch.Tensor):
        return x
    if x.dim() and x.shape[0] == 1:
        x = torch.cat([x, x])       # a symbolic size of 1 would be specialised to 1
    sizes = [DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (x.dim() - 1) if x.dim() else []
    return mode.from_tensor(x, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

