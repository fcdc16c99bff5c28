"""Allocations filled by slice assignment, rewritten as the cat they compute.

Cross-scan code written in torch fills an uninitialised tensor slice by slice along one axis, the
directions axis (VMamba's torch path, GroupMamba's `CrossScan_k`, ...):

    xs = x.new_empty((B, 4, C, L)); xs[:, 0] = rows; xs[:, 1] = cols
    xs[:, 2:4] = torch.flip(xs[:, 0:2], dims=[-1])

torch.export keeps the in-place writes (`select` / `slice` views of the allocation, `aten::copy_`
into them). The value every reader sees is a function of what was written before it: this pass
replaces each read by that function, built from data movement only (`unsqueeze` of a slice's
value, `slice` / `select` of written values, `cat` of the pieces along the axis), and drops the
allocation and its writes. The analysis then follows the tokens through those ops by evaluating
them on position tensors (analysis/tokens/movement.py), as it does for a cat written by hand.

Rewritten only when the whole pattern is understood: every use of the allocation is a view chain
of full slices and at most one `select` or step-1 `slice` along one common axis, every write is a
`copy_` of a value of the view's shape and dtype whose result is unused, and every read finds the
elements it reads written before it. Anything else (strided or 2-D slice writes, `index_put_`, a
read of an element never written, an in-place op on the allocation or on a view of it other than
those writes, a view of it taken before a later write) is left as it is, and the analysis refuses
the allocation by name.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from .graph_edit import copy_graph, emit, module_like, shape_of

aten = torch.ops.aten
ALLOCATIONS = (aten.new_empty.default, aten.empty_like.default, aten.empty.memory_format)
_SLICE, _SELECT, _COPY = aten.slice.Tensor, aten.select.int, aten.copy_.default


@dataclass(frozen=True)
class _View:
    """A view of the allocation: the elements [start, stop) of `axis` (None: the whole tensor),
    with `axis` removed when it is a select."""

    node: fx.Node
    axis: Optional[int]
    start: int
    stop: int
    selects: bool


@dataclass(frozen=True)
class _Run:
    """Elements [start, stop) of the axis hold `value` (its own axis runs over exactly them)."""

    start: int
    stop: int
    value: object   # an fx.Node once materialised, the copied value's node before


def functionalize_slice_fills(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` in which every understood slice-filled allocation is a cat (module docstring);
    `gm` itself when there is none."""
    plans = [plan for plan in map(_plan, _allocations(gm.graph)) if plan is not None]
    if not plans:
        return gm
    graph, mapping = copy_graph(gm.graph)
    for views, events, alloc in plans:
        _materialise(graph, [_remap(v, mapping) for v in views],
                     [(kind, mapping[node], _remap(view, mapping)) for kind, node, view in events], mapping[alloc])
    return module_like(gm, graph)


def _remap(view: _View, mapping: dict) -> _View:
    return _View(mapping[view.node], view.axis, view.start, view.stop, view.selects)


def _allocations(graph: fx.Graph) -> list:
    return [n for n in graph.nodes if n.op == "call_function" and n.target in ALLOCATIONS]


def _views(alloc: fx.Node) -> Optional[list]:
    """Every view chain from the allocation, or None when one is not a view this pass reads."""
    ndim = len(shape_of(alloc))
    found, stack = [], [(alloc, _View(alloc, None, 0, 0, False), list(range(ndim)))]
    while stack:
        node, view, dims = stack.pop()           # dims: which allocation axis each of node's axes is
        found.append(view)
        for user in node.users:
            if user.target not in (_SLICE, _SELECT) or user.args[0] is not node:
                continue
            step = _step(user, node, dims, view)
            if step is None:
                return None
            stack.append((user, *step))
    return found


def _step(user: fx.Node, node: fx.Node, dims: list, view: _View) -> Optional[tuple]:
    """The view `user` makes of `node` (itself a view `view` with axes `dims`), or None."""
    dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
    size = shape_of(node)
    if not isinstance(dim, int) or size is None:
        return None
    dim = dim % len(size)
    axis, length = dims[dim], size[dim]
    if user.target is _SELECT:
        index = user.args[2] if len(user.args) > 2 else user.kwargs.get("index")
        if view.axis is not None or not isinstance(index, int) or not isinstance(length, int):
            return None
        index = index % length
        return _View(user, axis, index, index + 1, True), dims[:dim] + dims[dim + 1:]
    start, stop, step = (list(user.args[2:]) + [None, None, None])[:3]
    start, stop, step = start or 0, sys.maxsize if stop is None else stop, step or 1
    if not all(isinstance(v, int) for v in (start, stop, step)) or step != 1 or start < 0 or stop < 0:
        return None
    if start == 0 and (stop == sys.maxsize or (isinstance(length, int) and stop >= length)):
        return _View(user, view.axis, view.start, view.stop, view.selects), dims
    if view.axis is not None or not isinstance(length, int):
        return None
    if start >= min(stop, length):
        return None                              # an empty slice: nothing this pass needs to read
    return _View(user, axis, start, min(stop, length), False), dims


def _plan(alloc: fx.Node) -> Optional[tuple]:
    """(views, events in graph order, alloc) when the allocation's fills are understood, else None."""
    shape = shape_of(alloc)
    views = _views(alloc) if shape is not None else None
    if not views:
        return None
    axes = {v.axis for v in views if v.axis is not None}
    if len(axes) != 1:
        return None
    axis = axes.pop()
    if not isinstance(shape[axis], int):
        return None
    view_nodes = {v.node for v in views}
    order = {n: i for i, n in enumerate(alloc.graph.nodes)}
    events = []
    for view in views:
        for user in view.node.users:
            if user in view_nodes:
                continue
            if user.target is _COPY and user.args[0] is view.node:
                if user.users or not same_value_type(user.args[1], view.node) or view.axis is None:
                    return None
                events.append(("write", user, view))
            elif writes_through(user):
                return None
            else:
                events.append(("read", user, view))
    events.sort(key=lambda e: order[e[1]])
    last_write = max((order[node] for kind, node, _ in events if kind == "write"), default=-1)
    if any(kind == "read" and _is_view(node) and order[node] < last_write for kind, node, _ in events):
        return None       # a view taken before a later write would see that write: not a value at one time
    written = [False] * shape[axis]
    for kind, _, view in events:
        span = range(shape[axis]) if view.axis is None else range(view.start, view.stop)
        if kind == "write":
            for i in span:
                written[i] = True
        elif not all(written[i] for i in span):
            return None
    return (views, events, alloc) if any(kind == "write" for kind, _, _ in events) else None


def _schema(node: fx.Node):
    return getattr(node.target, "_schema", None) if node.op == "call_function" else None


def _is_view(node: fx.Node) -> bool:
    """`node`'s result aliases its input (`view`, `permute`, `unsqueeze`, ...)."""
    schema = _schema(node)
    return schema is not None and bool(schema.returns) and schema.returns[0].alias_info is not None


def writes_through(node: fx.Node) -> bool:
    """`node` writes into what it reads in place (`add_`), or is a view (`permute`, `view`) that something
    writes through: a read this pass would turn into a copy, losing the write."""
    schema = _schema(node)
    if schema is None:
        return False
    if schema.is_mutable:
        return True
    return _is_view(node) and any(writes_through(user) for user in node.users)


def same_value_type(value, view: fx.Node) -> bool:
    v, w = value.meta.get("val") if isinstance(value, fx.Node) else None, view.meta.get("val")
    return isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor) and v.dtype == w.dtype \
        and tuple(v.shape) == tuple(w.shape)


def _materialise(graph: fx.Graph, views: list, events: list, alloc: fx.Node) -> None:
    axis = next(v.axis for v in views if v.axis is not None)
    runs: list = []
    for kind, node, view in events:
        if kind == "write":
            value = node.args[1]
            if view.selects:
                value = emit(graph, node, aten.unsqueeze.default, (value, axis))
            runs = _overwrite(runs, _Run(view.start, view.stop, value))
            continue
        stop = shape_of(alloc)[axis] if view.axis is None else view.stop
        start = 0 if view.axis is None else view.start
        node.replace_input_with(view.node, _read(graph, node, runs, axis, start, stop, view.selects))
    for kind, node, _ in events:
        if kind == "write":
            graph.erase_node(node)
    for view in sorted(views, key=lambda v: -_index(graph, v.node)):
        if not view.node.users:
            graph.erase_node(view.node)


def _index(graph: fx.Graph, node: fx.Node) -> int:
    return next(i for i, n in enumerate(graph.nodes) if n is node)


def _overwrite(runs: list, new: _Run) -> list:
    """The runs after `new` is written over them (what it covers of older runs is cut away)."""
    kept = []
    for run in runs:
        if run.stop <= new.start or run.start >= new.stop:
            kept.append(run)
            continue
        if run.start < new.start:
            kept.append(_Run(run.start, new.start, ("cut", run, run.start, new.start)))
        if run.stop > new.stop:
            kept.append(_Run(new.stop, run.stop, ("cut", run, new.stop, run.stop)))
    return sorted(kept + [new], key=lambda r: r.start)


def _read(graph: fx.Graph, reader: fx.Node, runs: list, axis: int, start: int, stop: int, selects: bool) -> fx.Node:
    """The value of elements [start, stop) of the axis, emitted before `reader`."""
    pieces = []
    for run in runs:
        lo, hi = max(run.start, start), min(run.stop, stop)
        if lo >= hi:
            continue
        value = _value(graph, reader, run, axis)
        if selects:
            return emit(graph, reader, _SELECT, (value, axis, lo - run.start))
        if (lo, hi) != (run.start, run.stop):
            value = emit(graph, reader, _SLICE, (value, axis, lo - run.start, hi - run.start))
        pieces.append(value)
    return pieces[0] if len(pieces) == 1 else emit(graph, reader, aten.cat.default, (pieces, axis))


def _value(graph: fx.Graph, reader: fx.Node, run: _Run, axis: int) -> fx.Node:
    """A run's value as a node (a cut of an older run sliced out of it, before `reader`)."""
    if not isinstance(run.value, tuple):
        return run.value
    _, older, lo, hi = run.value
    return emit(graph, reader, _SLICE, (_value(graph, reader, older, axis), axis, lo - older.start, hi - older.start))
