"""Pickling a pruned graph (``torch.save(pruned)``, ``pickle``, ``copy.deepcopy``).

torch.fx pickles a GraphModule as its generated code and traces that code again on load, which
fails on the graph's run-time helpers (they iterate over shapes), and torch.export's guard module
holds an unpicklable closure. So the graph is pickled as its node list instead: every node's op,
name, target (an ATen/custom operator by its qualified name, a function by reference), arguments
(other nodes by name) and the mambaprune marks of its meta; the parameters and submodules go as
they are. The guard module is left out: ``PrunedModel.check_inputs`` and the call signature check
what it checked. A graph calling a local function (a callable metric's wrapper) is refused with a
clear error pointing to ``.export(".pt2")``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import InvalidArgumentTypeError
from ..meta_keys import KEPT_POSITIONS

GUARDS = "_guards_fn"
KEPT_META = (KEPT_POSITIONS,)


@dataclass(frozen=True)
class _Ref:
    name: str


@dataclass(frozen=True)
class _Op:
    namespace: str
    name: str
    overload: str

    def resolve(self):
        return getattr(getattr(getattr(torch.ops, self.namespace), self.name), self.overload)


def graph_state(gm: fx.GraphModule) -> dict:
    """A picklable description of ``gm``: its nodes, code generator, parameters, buffers and submodules."""
    nodes = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == GUARDS:
            continue
        refer = (lambda a: _Ref(a.name))
        meta = {key: node.meta[key] for key in KEPT_META if key in node.meta}
        nodes.append((node.op, node.name, _encode_target(node.target), fx.node.map_arg(node.args, refer),
                      fx.node.map_arg(node.kwargs, refer), meta))
    root = torch.nn.Module()
    for name, module in gm.named_children():
        if name != GUARDS:
            root.add_module(name, module)
    for name, param in gm.named_parameters(recurse=False):
        root.register_parameter(name, param)
    for name, buffer in gm.named_buffers(recurse=False):
        root.register_buffer(name, buffer)
    constants = {node.target: _get(gm, node.target) for node in gm.graph.nodes if node.op == "get_attr"}
    return {"nodes": nodes, "codegen": gm.graph._codegen, "root": root, "constants": constants}


def graph_module_of(state: dict) -> fx.GraphModule:
    """The GraphModule ``graph_state`` described."""
    graph = fx.Graph()
    graph._codegen = state["codegen"]
    env = {}
    resolve = (lambda a: env[a.name] if isinstance(a, _Ref) else a)
    for op, name, target, args, kwargs, meta in state["nodes"]:
        args = torch.utils._pytree.tree_map(resolve, args, is_leaf=lambda a: isinstance(a, _Ref))
        kwargs = torch.utils._pytree.tree_map(resolve, kwargs, is_leaf=lambda a: isinstance(a, _Ref))
        target = target.resolve() if isinstance(target, _Op) else target
        node = graph.create_node(op, target, tuple(args) if op != "output" else args, dict(kwargs), name=name)
        node.meta.update(meta)
        env[name] = node
    root = state["root"]
    for target, value in state["constants"].items():
        if not _has(root, target):
            setattr(root, target, value)
    return fx.GraphModule(root, graph)


def _encode_target(target):
    if isinstance(target, torch._ops.OpOverload):
        namespace, _, name = target._schema.name.partition("::")
        return _Op(namespace, name, target._overloadname or "default")
    if "<locals>" in getattr(target, "__qualname__", ""):
        raise InvalidArgumentTypeError(
            f"this pruned model cannot be pickled: its graph calls the local function {target.__qualname__} (a "
            "callable metric is called through one). Save it with .export('model.pt2') instead, or compile "
            "with a named metric to pickle it.")
    return target


def _get(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _has(module, dotted: str) -> bool:
    try:
        _get(module, dotted)
        return True
    except AttributeError:
        return False
