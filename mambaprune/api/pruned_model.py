"""The module compile_pruned returns: the pruned graph, its report, and input checks at call time."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..capture import flat_inputs
from ..errors import BatchSizeError
from ..meta_keys import KEPT_POSITIONS
from ..settings import Backend


class PrunedModel(torch.nn.Module):
    """Calls like the original model; `.report` says what was pruned; `.graph_module` is the program."""

    def __init__(self, graph_module: fx.GraphModule, report, example_inputs: tuple, backend: Backend,
                 static_batch: int | None = None):
        super().__init__()
        self.static_batch = static_batch   # the only batch a graph captured with a fixed batch runs
        self.graph_module = graph_module
        self.report = report
        self.backend = Backend.parse(backend, "backend")
        self._input_spec = [(tuple(x.shape[1:]), x.dtype, x.device) if isinstance(x, torch.Tensor) else None
                            for x in example_inputs]
        self._runner = _make_runner(self, self.backend)

    def forward(self, *args):
        self.check_inputs(args)
        return self._runner(*args)

    def export(self, path, format=None, **options):
        """Write a deployable file; returns `path`.

        format: from the suffix (``.onnx``, ``.pt2``, ``.engine`` / ``.ts`` for TensorRT) or
        ``format=`` "onnx", "pt2" or "tensorrt". An existing file is replaced atomically (temporary
        file + rename), so a failed export leaves it as it was. Options: ONNX ``scan_form=``
        ("scan" or "doubling"), ``opset_version=``; TensorRT ``min_batch=``, ``opt_batch=``,
        ``max_batch=``, ``enabled_precisions=`` and other torch_tensorrt.dynamo.compile settings.
        See mambaprune/runtime/backends/export.py.
        """
        from ..runtime.backends.export import export_pruned
        return export_pruned(self, path, format, **options)

    @torch.no_grad()
    def kept_positions(self, *args) -> dict:
        """{site: (batch, K) original token positions kept there} for these inputs (eager run)."""
        self.check_inputs(args)
        wanted = {n: n.meta[KEPT_POSITIONS] for n in self.graph_module.graph.nodes if KEPT_POSITIONS in n.meta}
        found = {}

        class Recorder(torch.fx.Interpreter):
            def run_node(self, node):
                value = super().run_node(node)
                if node in wanted:
                    found[wanted[node]] = value.clone()
                return value

        Recorder(self.graph_module).run(*flat_inputs(args))
        return dict(sorted(found.items()))

    def check_inputs(self, args: tuple) -> None:
        if len(args) != len(self._input_spec):
            raise ValueError(f"the pruned model takes {len(self._input_spec)} input(s); got {len(args)}")
        for position, (arg, spec) in enumerate(zip(args, self._input_spec)):
            if spec is None:
                continue
            shape, dtype, device = spec
            if not isinstance(arg, torch.Tensor):
                raise ValueError(f"input {position} must be a tensor of shape (batch, {', '.join(map(str, shape))})")
            if tuple(arg.shape[1:]) != shape or arg.dim() != len(shape) + 1:
                raise ValueError(f"input {position} has shape {tuple(arg.shape)}; expected (batch, "
                                 f"{', '.join(map(str, shape))}) (token counts are compiled in: recompile for "
                                 "another input size)")
            if self.static_batch is not None and arg.shape[0] != self.static_batch:
                raise BatchSizeError(
                    f"input {position} has batch {arg.shape[0]}; this pruned model runs only batches of "
                    f"{self.static_batch}: torch.export could not capture the model with a dynamic batch (its code "
                    f"makes the batch a constant, e.g. int(B) in MambaVision's window_reverse), so it was captured "
                    f"with the example batch. Compile again with example inputs of batch {arg.shape[0]}.")
            if arg.dtype != dtype:
                raise ValueError(f"input {position} has dtype {arg.dtype}; the model was compiled for {dtype}")
            if arg.device.type != device.type:
                raise ValueError(f"input {position} is on {arg.device}; the model was compiled on {device} "
                                 "(move the input, or compile the model on that device)")


def _make_runner(pruned: PrunedModel, backend: Backend):
    if backend is Backend.INDUCTOR:
        return torch.compile(pruned.graph_module)
    if backend is Backend.ONNXRUNTIME:
        from ..runtime.backends.onnxruntime_backend import onnxruntime_module
        return onnxruntime_module(pruned)
    if backend is Backend.TENSORRT:
        from ..runtime.backends.tensorrt_backend import tensorrt_module
        return tensorrt_module(pruned)
    return pruned.graph_module
