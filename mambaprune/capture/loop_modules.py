"""Modules that run a Python token loop, traced once by torch's tracer and exported already lifted.

torch.export unrolls a token loop and pays its symbolic-shape bookkeeping on every unrolled node
(4-5 ms a node with a dynamic batch: most of a capture at L = 576; benchmarks/loop_capture_time.py).
torch's own tracer (`make_fx`, pre-dispatch: the same aten ops) with the batch fixed costs a fraction
of that. So, before the export:

1. one eager forward at the example batch counts the aten ops each module runs itself (not in its
   submodules); a module running more than LOOP_OPS is a loop candidate;
2. each candidate, called once with positional tensor arguments, is traced by `make_fx` on the
   arguments it got, at two batch sizes (2 and 3), its parameters and buffers as inputs;
3. its loops are lifted in both traces (token_loops.py, checked against the traced module on those
   arguments); the two lifted graphs must be the same graph but for integers that grow with the batch,
   each read as a * batch + c;
4. for the export, the module's forward is that graph with the batch symbolic (read from the argument
   that carries it), run on the module's own parameters, so torch.export sees one scan per loop.

The module's own submodules then do not appear in the export's module stack (their ops are the
module's), the parameters keep their names. Anything not understood leaves the module as it is (the
export unrolls its loop, token_loops.py lifts it afterwards, slowly): a candidate called twice or with
other than tensors, a trace or lifting that fails, two traces that differ in more than sizes.
capture.py checks the exported model against the model on the example inputs at two batch sizes and
exports again without this when they disagree.
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

from .token_loops import lift_token_loops

LOOP_OPS = 1000          # aten ops a module runs itself in one forward before it is taken for a loop
_BATCHES = (2, 3)


@dataclass(frozen=True)
class _Replay:
    """A module's lifted graph with the batch symbolic (read from the argument that carries it)."""

    gm: fx.GraphModule
    names: tuple         # the module's parameters and buffers, in the order of the graph's first inputs


@contextlib.contextmanager
def loops_replayed(model: torch.nn.Module, example_inputs: tuple):
    """While open, every loop module of `model` (module docstring) runs its lifted graph; yields the
    LiftedLoops. `model` is the capture's private copy: its forwards are put back on exit."""
    replays, lifted = {}, []
    paths = {module: path for path, module in model.named_modules()}
    for module, calls in _loop_modules(model, example_inputs).items():
        try:
            found = _replay_of(module, calls)
        except Exception:      # noqa: BLE001 - anything not understood leaves the module to the export
            found = None
        if found is not None:
            replays[module], loops = found
            lifted.extend(replace(loop, where=paths[module] or "<top level>") for loop in loops)
    try:
        for module, replay in replays.items():
            module.forward = _forward(module, replay)
        yield lifted
    finally:
        for module in replays:
            del module.forward


# --- 1. which modules loop ---------------------------------------------------------------------

class _OwnOps(TorchDispatchMode):
    def __init__(self, stack: list, counts: dict):
        super().__init__()
        self.stack, self.counts = stack, counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.stack:
            self.counts[self.stack[-1]] = self.counts.get(self.stack[-1], 0) + 1
        return func(*args, **(kwargs or {}))


def _loop_modules(model: torch.nn.Module, example_inputs: tuple) -> dict:
    """{module: [the positional arguments of each call at batches 2 and 3]} for the loop candidates."""
    stack, counts, calls = [], {}, {}
    modules = set(model.modules())

    def enter(module, args):
        if module in modules:
            stack.append(module)
            calls[module] = calls.get(module, 0) + 1

    def leave(module, args, output):
        if stack and stack[-1] is module:
            stack.pop()

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave)]
    try:
        with torch.no_grad(), _OwnOps(stack, counts):
            model(*example_inputs)
    except Exception:          # noqa: BLE001 - a model that does not run eagerly here is left to the export
        return {}
    finally:
        for hook in hooks:
            hook.remove()
    loops = [m for m, n in counts.items() if n >= LOOP_OPS and calls[m] == 1]
    return _arguments_at(model, loops, example_inputs) if loops else {}


def _arguments_at(model: torch.nn.Module, modules: list, example_inputs: tuple) -> dict:
    """{module: its positional arguments in the runs of the model at each of _BATCHES}, for the modules
    called with tensors only (no keywords)."""
    seen = {module: [] for module in modules}

    def record(module, args, kwargs):
        tensors = all(isinstance(a, torch.Tensor) for a in args) and not kwargs
        seen[module].append(tuple(a.detach() for a in args) if tensors else None)

    hooks = [module.register_forward_pre_hook(record, with_kwargs=True) for module in modules]
    try:
        with torch.no_grad():
            for batch in _BATCHES:
                model(*(at_batch(x, batch) for x in example_inputs))
    except Exception:          # noqa: BLE001 - a model that runs one batch size only is left to the export
        return {}
    finally:
        for hook in hooks:
            hook.remove()
    return {m: calls for m, calls in seen.items() if len(calls) == len(_BATCHES) and None not in calls}


def at_batch(x, batch: int):
    """`x` with `batch` samples (its own, repeated as needed); anything but a batched tensor as it is."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    return x[torch.arange(batch) % x.shape[0]]


# --- 2.-3. traced, lifted, and the batch made symbolic ------------------------------------------

def _replay_of(module: torch.nn.Module, calls: list) -> Optional[tuple]:
    if len(calls) != len(_BATCHES):
        return None
    batch = _batch_position(calls)
    if batch is None:
        return None
    state = dict(module.named_parameters())
    state.update(module.named_buffers())
    names = tuple(state)
    traced = []
    for args in calls:
        flat = tuple(state[n].detach() for n in names) + args
        with torch.no_grad():
            gm = make_fx(_functional(module, names), tracing_mode="fake", pre_dispatch=True)(*flat)
        lifted_gm, loops = lift_token_loops(gm, flat)
        if not loops:
            return None
        traced.append((lifted_gm, loops))
    general = _general(traced[0][0], traced[1][0], (len(names) + batch[0], batch[1]))
    if general is None:
        return None
    return _Replay(general, names), traced[0][1]


def _functional(module: torch.nn.Module, names: tuple):
    def run(*flat):
        state = dict(zip(names, flat[:len(names)]))
        return torch.func.functional_call(module, state, tuple(flat[len(names):]))
    return run


def _batch_position(calls: list) -> Optional[tuple]:
    """(argument, dim) whose size is the batch in every call (and the only size that differs)."""
    found = []
    for i, args in enumerate(zip(*calls)):
        shapes = [tuple(a.shape) for a in args]
        if len({len(s) for s in shapes}) != 1:
            return None
        for d, sizes in enumerate(zip(*shapes)):
            if sizes == _BATCHES:
                found.append((i, d))
            elif len(set(sizes)) != 1:
                return None
    return found[0] if found and len({d for _, d in found}) == 1 else None


def _general(g2: fx.GraphModule, g3: fx.GraphModule, batch: tuple) -> Optional[fx.GraphModule]:
    """g2's graph with every integer that differs from g3's read as a * batch + c, the batch being dim
    batch[1] of input batch[0]; None when the graphs differ otherwise."""
    nodes2, nodes3 = list(g2.graph.nodes), list(g3.graph.nodes)
    if len(nodes2) != len(nodes3):
        return None
    index2, index3 = {n: i for i, n in enumerate(nodes2)}, {n: i for i, n in enumerate(nodes3)}
    graph = fx.Graph()
    mapping, symbolic = {}, {}
    placeholders = [n for n in nodes2 if n.op == "placeholder"]

    def size(a: int, c: int) -> fx.Node:
        """a * batch + c, emitted once (a graph's placeholders come first: the batch's carrier is mapped)."""
        if "batch" not in symbolic:
            carrier = mapping[placeholders[batch[0]]]
            symbolic["batch"] = graph.call_function(torch.ops.aten.sym_size.int, (carrier, batch[1]))
        if (a, c) not in symbolic:
            value = symbolic["batch"] if a == 1 else graph.call_function(operator.mul, (symbolic["batch"], a))
            symbolic[(a, c)] = value if c == 0 else graph.call_function(operator.add, (value, c))
        return symbolic[(a, c)]

    def merge(x, y):
        if isinstance(x, fx.Node):
            if not isinstance(y, fx.Node) or index2[x] != index3[y]:
                raise _Mismatch
            return mapping[x]
        if isinstance(x, (list, tuple)):
            if not isinstance(y, (list, tuple)) or len(x) != len(y):
                raise _Mismatch
            return type(x)(merge(a, b) for a, b in zip(x, y))
        if isinstance(x, dict):
            if not isinstance(y, dict) or x.keys() != y.keys():
                raise _Mismatch
            return {k: merge(x[k], y[k]) for k in x}
        if type(x) is int and type(y) is int and x != y:
            a, remainder = divmod(y - x, _BATCHES[1] - _BATCHES[0])
            if remainder:
                raise _Mismatch
            return size(a, x - a * _BATCHES[0])
        if type(x) is not type(y) or x != y:
            raise _Mismatch
        return x

    try:
        for n2, n3 in zip(nodes2, nodes3):
            if n2.op != n3.op or n2.target != n3.target:
                return None
            if n2.op == "get_attr":
                return None                    # a constant made while tracing: not one value at every batch
            if n2.op == "placeholder":
                mapping[n2] = graph.placeholder(n2.name)
            else:
                mapping[n2] = graph.create_node(n2.op, n2.target, merge(n2.args, n3.args),
                                                merge(n2.kwargs, n3.kwargs))
            mapping[n2].meta = dict(n2.meta)
    except _Mismatch:
        return None
    graph.lint()
    return fx.GraphModule(torch.nn.Module(), graph)


class _Mismatch(Exception):
    """The two traces differ in more than the sizes that grow with the batch."""


# --- 4. the forward the export sees ------------------------------------------------------------

def _forward(module: torch.nn.Module, replay: _Replay):
    def forward(*args):
        state = dict(module.named_parameters())
        state.update(module.named_buffers())
        return fx.Interpreter(replay.gm).run(*(state[n] for n in replay.names), *args)
    return forward
