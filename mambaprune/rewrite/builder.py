"""The graph the rewrite builds, and the constants it needs, kept apart from the graph it reads.

Constant tables (token orders, ranks, protected positions) become attributes of the OUTPUT module
only: the captured module the rewrite reads is never touched, however many rewrites it serves.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.graph_module import _get_attr


class GraphBuilder:
    def __init__(self, source: fx.GraphModule):
        self.source = source
        self.graph = fx.Graph()
        self.constants: dict = {}      # attribute name -> tensor, for the output module
        self._named: dict = {}         # (name, dtype, numel, bytes hash) -> attribute name
        self._cache: dict = {}

    def call(self, fn, *args, **kwargs) -> fx.Node:
        return self.graph.call_function(fn, args, kwargs)

    def cached(self, key, build):
        """`build()` once per key (index nodes shared by every user at a site)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def constant(self, name: str, value: torch.Tensor) -> fx.Node:
        """A get_attr node for a constant table; equal tables share one attribute."""
        key = (name, value.dtype, value.numel(), hash(value.cpu().numpy().tobytes()))
        if key not in self._named:
            serial = len(self._named)
            while hasattr(self.source, f"_mambaprune_{name}_{serial}") or f"_mambaprune_{name}_{serial}" in self.constants:
                serial += 1
            attr = f"_mambaprune_{name}_{serial}"
            self.constants[attr] = value
            self._named[key] = attr
        return self.graph.get_attr(self._named[key])

    def module(self) -> fx.GraphModule:
        """The output GraphModule: the source's attributes it uses (shared, not copied) and the constants."""
        self.graph._codegen = self.source.graph._codegen
        root = {}
        for node in self.graph.nodes:
            if node.op in ("get_attr", "call_module"):
                root[node.target] = self.constants[node.target] if node.target in self.constants \
                    else _get_attr(self.source, node.target)
        gm = fx.GraphModule(root, self.graph)
        gm.training = self.source.training   # the flag only: submodules may be shared with the source
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return gm
