"""What the capture's graph rewrites (slice_fills.py, token_loops.py) share: a copy of the exported
graph to edit (a pass never changes its input) and new nodes with their fake values and provenance."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

_PROVENANCE = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn")


def shape_of(node) -> Optional[tuple]:
    """The shape of a node's fake value (None for a non-tensor or a non-node)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def copy_graph(graph: fx.Graph) -> tuple:
    """A copy of `graph` (its pytree codegen too) and the map from its nodes to their copies."""
    copied, mapping = fx.Graph(), {}
    value, output = copied.graph_copy(graph, mapping, return_output_node=True)
    copied._codegen = copy.deepcopy(graph._codegen)
    copied.output(value, type_expr=getattr(output, "type", None)).meta = dict(output.meta)
    return copied, mapping


def module_like(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """`graph` (checked) as a GraphModule with `gm`'s attributes and meta."""
    graph.lint()
    out = fx.GraphModule(gm, graph)
    out.meta = dict(getattr(gm, "meta", {}))
    return out


def emit(graph: fx.Graph, before: fx.Node, target, args: tuple, kwargs: Optional[dict] = None) -> fx.Node:
    """`target(*args, **kwargs)` inserted before `before`, with its fake value and `before`'s provenance."""
    kwargs = kwargs or {}
    with graph.inserting_before(before):
        node = graph.call_function(target, args, kwargs)
    fake_args, fake_kwargs = pytree.tree_map_only(fx.Node, lambda n: n.meta["val"], (args, kwargs))
    fake = next(v for v in pytree.tree_leaves((fake_args, fake_kwargs)) if isinstance(v, torch.Tensor))
    with fake.fake_mode:
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    for key in _PROVENANCE:
        if key in before.meta:
            node.meta[key] = before.meta[key]
    return node
