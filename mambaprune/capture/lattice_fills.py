"""Allocations filled by strided slice writes, rewritten as the interleave they compute.

An atrous scan (EfficientVMamba's `EfficientMerge`) puts its sub-grids back into one grid by
writing every residue class of a stride into an uninitialised tensor:

    y = ys.new_empty((B, C, 2 * H, 2 * W))
    y[:, :, ::2, ::2] = y00;  y[:, :, 1::2, ::2] = y10;  y[:, :, ::2, 1::2] = y01;  y[:, :, 1::2, 1::2] = y11

The value read afterwards is data movement of the written values alone: along each strided axis
`a` (stride s), the s values of the residues are stacked after `a` and the two axes flattened into
one (element i * s + r is element i of residue r). This pass emits that `stack` / `flatten` for
every read and drops the allocation and its writes; the analysis then follows the tokens through
them by evaluating them on position tensors (analysis/tokens/movement.py).

Rewritten only when the whole pattern is understood: every view of the allocation is a chain of
`slice`s, each over a whole axis with stride 1, or from a start below its stride to the end of an
axis the stride divides; every write is an unused `copy_` of a value of its view's shape and dtype
into such a view; all writes stride the same axes by the same strides and together write every
residue class exactly once; every read is of the whole allocation, after the last write, and
writes nothing back. Anything else is left as it is (capture/slice_fills.py reads the step-1 fills,
the analysis refuses what neither pass reads, naming the allocation).
"""
from __future__ import annotations

import itertools
import sys
from typing import Optional

import torch
import torch.fx as fx

from .graph_edit import copy_graph, emit, module_like, shape_of
from .slice_fills import ALLOCATIONS, same_value_type, writes_through

aten = torch.ops.aten
_SLICE, _COPY = aten.slice.Tensor, aten.copy_.default


def functionalize_lattice_fills(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` in which every understood strided fill is an interleave (module docstring);
    `gm` itself when there is none."""
    plans = [plan for plan in map(_plan, (n for n in gm.graph.nodes if n.op == "call_function"
                                          and n.target in ALLOCATIONS)) if plan is not None]
    if not plans:
        return gm
    graph, mapping = copy_graph(gm.graph)
    for alloc, writes, reads, views, strides in plans:
        values = {residues: mapping[node.args[1]] for residues, node in writes.items()}
        value = _interleave(graph, mapping[reads[0]], values, strides, ())
        for reader in reads:
            mapping[reader].replace_input_with(mapping[alloc], value)
        for node in [mapping[w] for w in writes.values()] + sorted((mapping[v] for v in views),
                                                                    key=lambda n: -_position(graph, n)):
            graph.erase_node(node)
        graph.erase_node(mapping[alloc])
    return module_like(gm, graph)


def _plan(alloc: fx.Node) -> Optional[tuple]:
    """(alloc, {residues: write}, reads, views, strides) when the fill is understood, else None.
    `strides` is ((axis, stride), ...) in axis order; `residues` the write's start on each of them."""
    shape = shape_of(alloc)
    if shape is None:
        return None
    writes, reads, views, stack, kinds = {}, [], [], [(alloc, {})], set()
    while stack:
        node, lattice = stack.pop()
        for user in node.users:
            if user.target is _SLICE and user.args[0] is node:
                step = _slice(user, node, lattice)
                if step is None:
                    return None
                views.append(user)
                stack.append((user, step))
            elif user.target is _COPY and user.args[0] is node and node is not alloc:
                if user.users or not lattice or not same_value_type(user.args[1], node):
                    return None
                kinds.add(tuple(sorted((axis, stride) for axis, (_, stride) in lattice.items())))
                residues = tuple(start for _, (start, _) in sorted(lattice.items()))
                if residues in writes:
                    return None
                writes[residues] = user
            elif node is alloc and not writes_through(user):
                reads.append(user)
            else:
                return None
    if len(kinds) != 1 or not reads:
        return None
    strides = kinds.pop()
    if set(writes) != set(itertools.product(*(range(s) for _, s in strides))):
        return None
    order = {n: i for i, n in enumerate(alloc.graph.nodes)}
    reads.sort(key=order.get)
    if order[reads[0]] < max(order[w] for w in writes.values()):
        return None
    return alloc, writes, reads, views, strides


def _slice(user: fx.Node, node: fx.Node, lattice: dict) -> Optional[dict]:
    """The lattice (axis -> (start, stride)) of the view `user` makes of `node` (a slice keeps the
    allocation's axes), or None when it is not a view this pass reads."""
    dim = user.args[1] if len(user.args) > 1 else 0
    size = shape_of(node)
    if not isinstance(dim, int) or size is None:
        return None
    dim = dim % len(size)
    start, stop, step = (list(user.args[2:]) + [None, None, None])[:3]
    start, stop, step = start or 0, sys.maxsize if stop is None else stop, step or 1
    length = size[dim]
    if not all(isinstance(v, int) for v in (start, stop, step)):
        return None
    if not (stop == sys.maxsize or (isinstance(length, int) and stop >= length)):
        return None
    if step == 1 and start == 0:
        return lattice
    if dim in lattice or not isinstance(length, int) or not 0 <= start < step or length % step:
        return None
    return {**lattice, dim: (start, step)}


def _interleave(graph: fx.Graph, reader: fx.Node, values: dict, strides: tuple, prefix: tuple) -> fx.Node:
    """The allocation's value: the written values stacked after each strided axis and flattened into it."""
    if len(prefix) == len(strides):
        return values[prefix]
    axis, stride = strides[len(prefix)]
    pieces = [_interleave(graph, reader, values, strides, prefix + (r,)) for r in range(stride)]
    stacked = emit(graph, reader, aten.stack.default, (pieces, axis + 1))
    return emit(graph, reader, aten.flatten.using_ints, (stacked, axis, axis + 1))


def _position(graph: fx.Graph, node: fx.Node) -> int:
    return next(i for i, n in enumerate(graph.nodes) if n is node)
