"""Feature matching for `recover`: the tensors a named submodule of the teacher reads, and the same tensors in
the pruned model's graph, so that the student can be trained to reproduce intermediate features as well as
outputs.

Teacher side: a forward pre-hook on ``teacher.get_submodule(name)`` records the floating tensors (with a batch
dim and at least one more) among its positional and keyword inputs, in pytree order. Student side: the pruned
graph keeps each node's ``nn_module_stack`` (torch.export), so the tensors the module reads are the nodes outside
it that nodes inside it consume, in the order of their first consumer; a copy of the graph (sharing every
parameter with the student) returns them next to the model's output. For a decoder over restored feature maps
(models/segmentation.py: ``decode_head``) these are the restored maps, pruned positions filled as the pruned
model fills them; at every kept position they are what the pruned backbone computed.

    before: ... maps = restore(...); logits = decode_head(maps); return logits
    after:  ... maps = restore(...); logits = decode_head(maps); return (logits, [maps...])
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import InvalidArgumentError, InvalidArgumentTypeError


def check_features(features, teacher: torch.nn.Module) -> tuple:
    """``features`` as a tuple of submodule names of ``teacher`` (a name, or a sequence of names)."""
    names = (features,) if isinstance(features, str) else features
    if not isinstance(names, Sequence) or not all(isinstance(n, str) and n for n in names):
        raise InvalidArgumentTypeError(f"recover: features must be a submodule name or a sequence of names "
                                       f"(e.g. 'decode_head'); got {features!r}")
    known = dict(teacher.named_modules())
    for name in names:
        if name not in known:
            close = [k for k in known if k and (name in k or k in name)][:5]
            raise InvalidArgumentError(f"recover: features names {name!r}, which is not a submodule of the teacher"
                                       f"{' (close: ' + ', '.join(close) + ')' if close else ''}; pass names from "
                                       "teacher.named_modules(), e.g. the decoder that reads the feature maps")
    return tuple(dict.fromkeys(names))


def feature_tensors(values) -> list:
    """The floating tensors with a batch dim and at least one more among ``values`` (pytree order)."""
    return [v for v in pytree.tree_leaves(values) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2]


class TeacherFeatures:
    """Records the inputs of the named submodules of ``teacher`` while it runs (a context manager)."""

    def __init__(self, teacher: torch.nn.Module, names: tuple):
        self.teacher, self.names, self.handles, self.seen = teacher, names, [], {}

    def __enter__(self):
        for name in self.names:
            def hook(module, args, kwargs, name=name):
                self.seen[name] = feature_tensors((args, kwargs))
            self.handles.append(self.teacher.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def take(self) -> list:
        """Every recorded tensor, module by module in ``names`` order (and forget them)."""
        missing = [n for n in self.names if n not in self.seen]
        if missing:
            raise InvalidArgumentError(f"recover: the teacher never called {', '.join(missing)} (features): name "
                                       "submodules its forward runs")
        out = [t for n in self.names for t in self.seen[n]]
        self.seen = {}
        return out


def _inside(node: fx.Node, name: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(path == name or path.startswith(name + ".") for path, _ in stack.values())


def module_inputs(graph: fx.Graph, name: str) -> list:
    """The nodes outside module ``name`` that its nodes read (not parameters / buffers), by first consumer."""
    inputs = []
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or not _inside(node, name):
            continue
        for arg in node.all_input_nodes:
            if arg.op != "get_attr" and not _inside(arg, name) and arg not in inputs:
                inputs.append(arg)
    return inputs


def with_features(student: fx.GraphModule, names: tuple) -> fx.GraphModule:
    """A GraphModule sharing ``student``'s parameters that takes ``student``'s inputs and returns
    ``(its output's flat leaves, [tensors read by each module])``."""
    graph = fx.Graph()
    copies: dict = {}
    flat_output = graph.graph_copy(student.graph, copies)
    read = []
    for name in names:
        nodes = module_inputs(student.graph, name)
        if not nodes:
            raise InvalidArgumentError(f"recover: the pruned graph has no node of module {name!r} (features): "
                                       "name a submodule whose computation the graph keeps (its nn_module_stack)")
        read += [copies[n] for n in nodes]
    graph.output((flat_output, read))
    codegen = copy.copy(student.graph._codegen)
    if getattr(codegen, "pytree_info", None) is not None:
        codegen.pytree_info = codegen.pytree_info._replace(out_spec=None)
    graph._codegen = codegen
    return fx.GraphModule(student, graph)
