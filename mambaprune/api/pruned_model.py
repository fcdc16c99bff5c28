"""The module compile_pruned returns: the pruned graph, its report, and input checks at call time."""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..capture import flat_inputs
from ..errors import BatchSizeError, InputMismatchError
from ..rewrite.select import run_recording_kept
from ..settings import Backend
from .engines import engine_for, exporter
from .pickling import graph_module_of, graph_state
from .signature import CallSignature


class PrunedModel(torch.nn.Module):
    """Calls like the original model; `.report` says what was pruned; `.graph_module` is the program."""

    def __init__(self, graph_module: fx.GraphModule, report, example_inputs: tuple, backend: Backend,
                 static_batch: int | None = None, signature: CallSignature | None = None):
        super().__init__()
        self.signature = signature or CallSignature(None, arity=len(example_inputs))
        self.static_batch = static_batch   # the only batch a graph captured with a fixed batch runs
        self.graph_module = graph_module
        self.report = report
        self.backend = Backend.parse(backend, "backend")
        self._input_spec = [(tuple(x.shape[1:]), x.dtype, x.device) if isinstance(x, torch.Tensor) else None
                            for x in example_inputs]
        # not a submodule: the runner is (or wraps) graph_module, whose weights state_dict lists once
        self.__dict__["_runner"] = _make_runner(self, self.backend)
        self._empty = empty_outputs(graph_module)   # the result of a batch of 0 (None: not known)

    def forward(self, *args, **kwargs):
        args = self.signature.bind(args, kwargs)
        self.check_inputs(args)
        if self._empty is not None and _batch(args) == 0:
            device = next(x.device for x in args if isinstance(x, torch.Tensor))
            return torch.utils._pytree.tree_map(lambda t: torch.empty_like(t, device=device), self._empty)
        return self._runner(*args)

    def __getstate__(self):
        """Pickling (torch.save, pickle, deepcopy): the graph as its node list (api/pickling.py); the
        backend's runner is rebuilt on load."""
        state = self.__dict__.copy()
        state["_modules"] = {k: v for k, v in self._modules.items() if k != "graph_module"}
        state["_graph_state"] = graph_state(self.graph_module)
        state.pop("_runner", None)
        return state

    def __setstate__(self, state):
        graph = graph_module_of(state.pop("_graph_state"))
        self.__dict__.update(state)
        self._modules["graph_module"] = graph
        self.__dict__["_runner"] = _make_runner(self, self.backend)

    def export(self, path, format=None, **options):
        """Write a deployable file; returns `path`.

        format: from the suffix (``.onnx``, ``.pt2``, ``.engine`` / ``.ts`` for TensorRT) or
        ``format=`` "onnx", "pt2", "tensorrt" or "aoti". An existing file is replaced atomically (temporary
        file + rename), so a failed export leaves it as it was. Options: ONNX ``scan_form=``
        ("scan" or "doubling"), ``opset_version=``; TensorRT ``min_batch=``, ``opt_batch=``,
        ``max_batch=``, ``enabled_precisions=`` and other torch_tensorrt.dynamo.compile settings.
        AOTInductor: ``format="aoti"`` (a ``.pt2`` package, see mambaprune/deployment/aoti.py).
        Triton Inference Server: ``format="triton"`` writes the model repository folder `path`
        (options ``name=``, ``max_batch_size=``, ``instances=``, ``max_queue_delay_us=``,
        ``threads=``, ``python_path=``: mambaprune/deployment/triton/repository.py).
        The formats live in mambaprune/deployment/ (reached through api/engines.py).
        """
        return exporter()(self, path, format, **options)

    @torch.no_grad()
    def kept_positions(self, *args, **kwargs) -> dict:
        """{site: (batch, K) original token positions kept there} for these inputs (eager run)."""
        args = self.signature.bind(args, kwargs)
        self.check_inputs(args)
        _, found = run_recording_kept(self.graph_module, flat_inputs(args))
        return {site: positions.clone() for site, positions in sorted(found.items())}

    def check_inputs(self, args: tuple) -> None:
        if len(args) != len(self._input_spec):
            raise InputMismatchError(f"the pruned model takes {len(self._input_spec)} input(s); got {len(args)}")
        for position, (arg, spec) in enumerate(zip(args, self._input_spec)):
            if spec is None:
                continue
            shape, dtype, device = spec
            if not isinstance(arg, torch.Tensor):
                raise InputMismatchError(f"input {position} must be a tensor of shape (batch, {', '.join(map(str, shape))})")
            if tuple(arg.shape[1:]) != shape or arg.dim() != len(shape) + 1:
                raise InputMismatchError(f"input {position} has shape {tuple(arg.shape)}; expected (batch, "
                                 f"{', '.join(map(str, shape))}) (token counts are compiled in: recompile for "
                                 "another input size)")
            if self.static_batch is not None and arg.shape[0] != self.static_batch:
                raise BatchSizeError(
                    f"input {position} has batch {arg.shape[0]}; this pruned model runs only batches of "
                    f"{self.static_batch}: torch.export could not capture the model with a dynamic batch (its code "
                    f"makes the batch a constant in a way capture cannot keep symbolic, e.g. math.floor of it), so it was captured "
                    f"with the example batch. Compile again with example inputs of batch {arg.shape[0]}.")
            if arg.dtype != dtype:
                raise InputMismatchError(f"input {position} has dtype {arg.dtype}; the model was compiled for {dtype}")
            if arg.device.type != device.type:
                raise InputMismatchError(f"input {position} is on {arg.device}; the model was compiled on {device} "
                                 "(move the input, or compile the model on that device)")


def _batch(args: tuple):
    return next((x.shape[0] for x in args if isinstance(x, torch.Tensor) and x.dim() > 0), None)


def empty_outputs(graph_module: fx.GraphModule):
    """The outputs of a batch of 0, built from the output nodes' symbolic shapes with the batch set
    to 0: nothing needs computing, and ops of the graph (a reshape with -1, top-k selection) cannot
    run on 0 samples. None when the graph has no dynamic batch or a shape does not follow from the
    batch alone (then the graph runs)."""
    batch = set()
    for node in graph_module.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0], torch.SymInt):
            batch |= val.shape[0].node.expr.free_symbols
    if not batch:
        return None
    output = next(iter(graph_module.graph.find_nodes(op="output")))

    def empty(leaf):
        val = leaf.meta.get("val") if isinstance(leaf, fx.Node) else leaf
        if not isinstance(val, torch.Tensor):
            raise LookupError
        shape = []
        for size in val.shape:
            size = size.node.expr.subs({symbol: 0 for symbol in batch}) if isinstance(size, torch.SymInt) else size
            if not getattr(size, "is_number", True):
                raise LookupError
            shape.append(int(size))
        if math.prod(shape) != 0:   # an output that does not follow the batch: the graph computes it
            raise LookupError
        return torch.empty(shape, dtype=val.dtype, device=val.device)

    try:
        flat = torch.utils._pytree.tree_map(empty, output.args[0])
    except LookupError:
        return None
    return graph_module.graph._codegen.process_outputs(flat)


def _make_runner(pruned: PrunedModel, backend: Backend):
    if backend is Backend.INDUCTOR:
        return torch.compile(pruned.graph_module)
    engine = engine_for(backend)
    return pruned.graph_module if engine is None else engine.runner(pruned)
