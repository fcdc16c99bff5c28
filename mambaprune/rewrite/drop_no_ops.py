"""Drop what a captured graph only re-checks or passes through: tensor-metadata asserts and no-op casts.

torch.export records every ``.to(dtype)`` / ``.float()`` of the traced code as an ``aten.to.dtype``
node, which returns its input unchanged when the dtype already matches, and an
``aten._assert_tensor_metadata`` check that the traced dtype and device still hold (ViM-T: 219 of
each, two dispatches per call for nothing). A PrunedModel checks the dtype and device of its inputs on
every call (PrunedModel.check_inputs) and every other dtype in the graph follows from them and from
the weights, so on the graph it runs the checks cannot fail and those casts never convert. Casts that
do convert (a half-precision model's fp32 norms) are kept.

Invariant: the returned GraphModule is new (the input module, its graph and its meta are untouched),
shares the input's weights and computes the same values; only nodes the rule names are gone.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from ..pass_infra import GraphPass, InvariantError, PassResult

_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)
_CASTS = (torch.ops.aten.to.dtype,)


def is_metadata_assert(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _ASSERTS and not node.users


def is_no_op_cast(node: fx.Node) -> bool:
    """``aten.to.dtype(x, dtype)`` of an x that already has that dtype, without copy=True or a memory format."""
    if node.op != "call_function" or node.target not in _CASTS or len(node.args) < 2:
        return False
    source = node.args[0]
    val = source.meta.get("val") if isinstance(source, fx.Node) else None
    options = dict(zip(("non_blocking", "copy", "memory_format"), node.args[2:]), **node.kwargs)
    plain = not options.get("copy", False) and options.get("memory_format") in (None, torch.preserve_format)
    return isinstance(val, torch.Tensor) and val.dtype == node.args[1] and plain


class DropNoOps(GraphPass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        graph, env = fx.Graph(), {}
        graph._codegen = gm.graph._codegen
        dropped = 0
        for node in gm.graph.nodes:
            if is_metadata_assert(node):
                dropped += 1
            elif is_no_op_cast(node):
                env[node] = env[node.args[0]]
                dropped += 1
            elif node.op == "output":
                graph.output(map_arg(node.args[0], env.__getitem__)).meta = dict(node.meta)
            else:
                env[node] = graph.node_copy(node, env.__getitem__)
        if not dropped:
            return PassResult(gm, False)
        out = fx.GraphModule(gm, graph)
        out.meta = dict(getattr(gm, "meta", {}))
        out.training = gm.training
        return PassResult(out, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [n.name for n in gm.graph.nodes if is_metadata_assert(n) or is_no_op_cast(n)]
        if left:
            raise InvariantError(f"no-op nodes left after DropNoOps: {left[:5]}")
